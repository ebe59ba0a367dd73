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
  config = _CONFIG.value
  validate_config(config)
  if config.data.source not in ('text_csv', 'raw'):
    raise ConfigError(f"data.source is {config.data.source!r}; preprocessing needs 'text_csv' "
                      "or 'raw'")
  if not (_WORKDIR.value or _OUT.value):
    raise app.UsageError('give --workdir or --out')
  from mer_jax import console  # pylint: disable=g-import-not-at-top
  from mer_jax.data import sources  # pylint: disable=g-import-not-at-top
  from mer_jax.preprocess import text_features  # pylint: disable=g-import-not-at-top
  from mer_jax.train import cpu_threefry  # pylint: disable=g-import-not-at-top
  from mer_jax.train import preemption  # pylint: disable=g-import-not-at-top
  cpu_threefry.unroll_threefry_on_cpu()  # fine-tuning's dropout (LipSyncNet, text encoder)
  if config.data.source == 'raw':
    from mer_jax.preprocess import raw  # pylint: disable=g-import-not-at-top
    if _OUT.value:
      out = _OUT.value
      stats = preemption.run_preemptible(raw.build_raw_shards, config, out,
                                         workdir=_WORKDIR.value or out + '.work')
      raw.report_stats(stats)
    else:
      out = preemption.run_preemptible(raw.ensure_raw_shards, config, _WORKDIR.value)
  elif _OUT.value:
    out = _OUT.value
    preemption.run_preemptible(text_features.build_text_shards, config, out)
  else:
    out = preemption.run_preemptible(sources.ensure_text_shards, config, _WORKDIR.value)
  console.say('text shards: %s', out)


if __name__ == '__main__':
  app.run(main)
