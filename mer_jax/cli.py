"""How the commands start: `python -m mer_jax.<command>` and its console script (pyproject.toml,
[project.scripts]) call the same `run()` of the command's module.

An absl command defines its flags in `run()`, not on import, so that any command modules can be
imported together (a test, a notebook): several of them define --config or --workdir. Its module
docstring is the usage `--help` prints, also from a console script (whose own `__main__` has no
docstring), and `--help` exits with status 0.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Sequence

from absl import app
from absl import flags
from absl import logging

from mer_jax import errors

HELP_FLAGS = ('help', 'helpshort', 'helpfull', 'helpxml', '?')


def run_absl(main: Callable, *, doc: str, define_flags: Callable[[], None],
             argv: Sequence[str] | None = None, quiet_libraries: bool = False) -> None:
  """Defines the command's flags, then `app.run`s `main`: a UserError is one line
  (errors.cli_main), a bad flag too (errors.parse_flags). `quiet_libraries`: unless --verbosity
  is given, only warnings of the libraries (Orbax, TFDS) reach the console, so what the command
  prints is what a run shows."""
  before = set(flags.FLAGS)
  define_flags()
  # absl's --help lists the flags of the module named by sys.argv[0]: a console script's.
  for name in sorted(set(flags.FLAGS) - before):
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])
  main_module = sys.modules['__main__']
  if not main_module.__doc__:
    main_module.__doc__ = doc
  app.run(errors.cli_main(_quiet(main) if quiet_libraries else main),
          argv=None if argv is None else list(argv), flags_parser=_parse_flags)


def _quiet(main: Callable) -> Callable:
  def wrapped(argv):
    if not flags.FLAGS['verbosity'].present:
      logging.set_verbosity(logging.WARNING)
    return main(argv)
  return wrapped


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return errors.parse_flags(argv)
  except SystemExit as e:
    if e.code == 1 and asks_for_help(argv):  # absl exits with 1 after printing the usage
      raise SystemExit(0) from None
    raise


def asks_for_help(argv: Sequence[str]) -> bool:
  return any(arg.startswith('-') and arg.lstrip('-').split('=')[0] in HELP_FLAGS
             for arg in argv[1:])


def prog(module: str) -> str:
  """The command's name for an argparse usage line: `python -m <module>`, or the console script's
  name when run as one."""
  script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ''
  if not script or script.endswith('.py') or script.startswith('-'):
    return f'python -m {module}'
  return script
