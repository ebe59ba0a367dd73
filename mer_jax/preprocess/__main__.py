"""Feature extraction only: `python -m mer_jax.preprocess --config C --workdir W`.

Writes the shards `python -m mer_jax.main` would build for the same config and workdir
(under workdir/data/, or data.cache_dir), or into `--out` when given, and prints the folder:
text-feature shards for data.source='text_csv' (configs/meld_text.py), the whole raw-clip front
end for data.source='raw' (configs/raw_demo.py: faces, LipSyncNet speaker selection, audio,
visual and text features), with throughput and error counts.
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from mer_jax import errors
from mer_jax.config_validation import ConfigError
from mer_jax.config_validation import validate_config

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (get_config()).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Workdir whose data/ folder receives the shards.')
_OUT = flags.DEFINE_string('out', None, 'Write the shards here instead (overwrites).')
flags.mark_flags_as_required(['config'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  config = errors.loaded_config(_CONFIG)
  validate_config(config)
  if config.data.source not in ('text_csv', 'raw'):
    raise ConfigError(f"data.source is {config.data.source!r}; preprocessing needs 'text_csv' "
                      "or 'raw'")
  if not (_WORKDIR.value or _OUT.value):
    raise app.UsageError('give --workdir or --out')
  # Imported after validation, so a bad config fails before JAX and the models load.
  from mer_jax.run import corpus  # pylint: disable=g-import-not-at-top
  out = corpus.extract_features(config, _WORKDIR.value, _OUT.value)
  print(f'shards: {out}')


if __name__ == '__main__':
  app.run(errors.cli_main(main), flags_parser=errors.parse_flags)
