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


def _config_file(argv: list[str]) -> str | None:
  """The file of `--config FILE[:arg]` (or `--config=...`) in `argv`, if given."""
  for i, arg in enumerate(argv[1:], 1):
    if arg == '--config' and i + 1 < len(argv):
      value = argv[i + 1]
    elif arg.startswith('--config='):
      value = arg[len('--config='):]
    else:
      continue
    return value.split(':', 1)[0] if not os.path.isfile(value) else value
  return None


def package_root(path: str) -> str:
  """The folder above the outermost package holding `path` (a package: a folder with
  __init__.py); for repo/configs/x.py, repo. A file in no package: its own folder."""
  folder = os.path.dirname(os.path.abspath(path))
  while os.path.isfile(os.path.join(folder, '__init__.py')):
    folder = os.path.dirname(folder)
  return folder


def make_config_importable(config_file: str) -> None:
  """Lets a config file import its siblings from any working directory.

  Config files import each other as `from configs import default`, which only works where
  `configs` is importable: Python puts the working directory on sys.path, so runs from the
  repository root worked and others failed with "No module named 'configs'". The root of the
  file's own package goes first (a config imports the configs beside it, not those of the
  working directory); the checkout that holds mer_jax goes last, so a config file outside the
  repository can still build on ours.
  """
  root = package_root(config_file)
  if root not in sys.path:
    sys.path.insert(0, root)
  checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if (os.path.isfile(os.path.join(checkout, 'configs', '__init__.py'))
      and checkout not in sys.path):
    sys.path.append(checkout)


def parse_flags(argv: list[str]) -> list[str]:
  """`flags_parser` for `app.run`: a bad flag or `--config.<key>` override is one message."""
  config_file = _config_file(argv)
  if config_file:
    make_config_importable(config_file)
  try:
    return flags.FLAGS(argv)
  except (OSError, ImportError, SyntaxError) as e:  # the config file cannot be loaded
    if wants_traceback():
      raise
    _exit_with('--config: ' + ' '.join(str(e).split()))
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
