"""Errors a user can fix (a config key, a file, a record, a workdir), reported as one message.

Every error type of the project that describes the user's input derives from `UserError`. The
command-line entry points wrap their `main` in `cli_main`: such an error prints `error: <message>`
on stderr and exits with status 2, with no traceback unless `--verbosity=1` (or more) or the
environment variable MER_JAX_TRACEBACK=1 asks for one. Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Callable

from absl import flags

EXIT_USER_ERROR = 2
TRACEBACK_ENV = 'MER_JAX_TRACEBACK'


class UserError(ValueError):
  """A problem in what the user gave: the message names the key, file, record or workdir."""


def wants_traceback() -> bool:
  if os.environ.get(TRACEBACK_ENV, '') not in ('', '0'):
    return True
  return flags.FLAGS.is_parsed() and flags.FLAGS['verbosity'].value >= 1


def cli_main(main: Callable) -> Callable:
  """`main` for `app.run` (or an argparse entry point) that reports a UserError in one line."""

  @functools.wraps(main)
  def wrapped(*args, **kwargs):
    try:
      return main(*args, **kwargs)
    except UserError as e:
      if wants_traceback():
        raise
      _exit_with(str(e))

  return wrapped


def _exit_with(message: str) -> None:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(EXIT_USER_ERROR)


def parse_flags(argv: list[str]) -> list[str]:
  """`flags_parser` for `app.run`: a bad flag or `--config.<key>` override is one message."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    lines = [l for l in str(e).splitlines() if l.strip()]
    if len(lines) > 1 and not wants_traceback():  # e.g. get_config raised: first and last line
      lines = [lines[0], lines[-1].strip()]
    _exit_with(' '.join(lines))
  except (AttributeError, KeyError) as e:  # ml_collections: an override of a key that is absent
    key = str(e.args[0] if e.args else e).strip('"\'')
    overrides = [a.split('=')[0] for a in argv[1:] if a.startswith('--config.')]
    _exit_with(f'the config has no key {key!r} (overrides given: {", ".join(overrides)})')
  return []  # unreachable: _exit_with exits


def loaded_config(config_flag):
  """The value of a `config_flags` flag. A config file that cannot be loaded (missing, a syntax
  error, get_config raising) is a UserError: config_flags defers that error to first use."""
  config = config_flag.value
  try:
    config.keys()
  except (OSError, ImportError, SyntaxError) as e:
    raise UserError('--config: ' + ' '.join(str(e).split())) from e
  return config
