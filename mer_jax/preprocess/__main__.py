"""Feature extraction only: `python -m mer_jax.preprocess --config C --workdir W` (installed:
`mer-jax-preprocess`). `--config.<key>=<value>` overrides a config key.

Writes the shards `python -m mer_jax.main` would build for the same config and workdir
(under workdir/data/, or data.cache_dir), or into `--out` when given, and prints the folder:
text-feature shards for data.source='text_csv' (configs/meld_text.py), the whole raw-clip front
end for data.source='raw' (configs/raw_demo.py: faces, LipSyncNet speaker selection, audio,
visual and text features), with throughput and error counts.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from mer_jax import cli
from mer_jax import errors
from mer_jax.config_validation import ConfigError
from mer_jax.config_validation import validate_config

FLAGS = flags.FLAGS


def define_flags() -> None:
  config_flags.DEFINE_config_file('config', None, 'Config file (get_config()).', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Workdir whose data/ folder receives the shards.')
  flags.DEFINE_string('out', None, 'Write the shards here instead (overwrites).')
  flags.mark_flags_as_required(['config'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = errors.loaded_config(FLAGS['config'])
  validate_config(config)
  if config.data.source not in ('text_csv', 'raw'):
    raise ConfigError(f"data.source is {config.data.source!r}; preprocessing needs 'text_csv' "
                      "or 'raw'")
  if not (FLAGS.workdir or FLAGS.out):
    raise app.UsageError('give --workdir or --out')
  # Imported after validation, so a bad config fails before JAX and the models load.
  from mer_jax.run import corpus  # pylint: disable=g-import-not-at-top
  out = corpus.extract_features(config, FLAGS.workdir, FLAGS.out)
  print(f'shards: {out}')


def run(argv=None) -> None:
  """The `mer-jax-preprocess` console script."""
  cli.run_absl(main, doc=__doc__, define_flags=define_flags, argv=argv,
               quiet_libraries=True)


if __name__ == '__main__':
  run()
