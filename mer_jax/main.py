"""Trains and evaluates every stage.

  python -m mer_jax.main --config configs/default.py --workdir W [--config.<key>=<value> ...]
  (installed: mer-jax-train [flags])

Rerunning with the same workdir resumes from its checkpoints.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from mer_jax import cli
from mer_jax import errors
from mer_jax.config_validation import validate_config

FLAGS = flags.FLAGS


def define_flags() -> None:
  config_flags.DEFINE_config_file('config', None, 'Config file (get_config()).', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Where shards, checkpoints and reports go.')
  flags.DEFINE_bool('multihost', False, 'Start JAX\'s distributed runtime with auto-detection '
                    '(Cloud TPU pod slices: one process per host).')
  flags.DEFINE_string('coordinator_address', '', 'host:port of process 0, for multi-process runs '
                      'elsewhere (GPU clusters, the localhost CPU test); needs --num_processes and '
                      '--process_id.')
  flags.DEFINE_integer('num_processes', 0, 'Processes in the run.')
  flags.DEFINE_integer('process_id', -1, 'This process\'s index.')
  flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = errors.loaded_config(FLAGS['config'])
  validate_config(config)
  # Imported after validation, so a bad config fails before JAX and the models load.
  from mer_jax.run import job  # pylint: disable=g-import-not-at-top
  job.run(config, FLAGS.workdir, coordinator_address=FLAGS.coordinator_address,
          num_processes=FLAGS.num_processes, process_id=FLAGS.process_id,
          multihost=FLAGS.multihost)


def run(argv=None) -> None:
  """The `mer-jax-train` console script."""
  cli.run_absl(main, doc=__doc__, define_flags=define_flags, argv=argv,
               quiet_libraries=True)


if __name__ == '__main__':
  run()
