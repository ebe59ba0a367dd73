"""Progress messages for people: printed (above any progress bar) and logged.

Library logs (Orbax, Grain) stay at WARNING unless `--verbosity` is given, so these lines are
what a run shows.
"""

from absl import logging
from tqdm import tqdm


def say(message: str, *args) -> None:
  text = message % args if args else message
  tqdm.write(text)
  logging.info(text)


def progress(iterable, *, total: int | None = None, desc: str = '', unit: str = 'it',
             enabled: bool = True):
  """A progress bar over `iterable` that disappears when done."""
  return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, disable=not enabled)
