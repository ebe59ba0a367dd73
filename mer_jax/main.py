"""Trains and evaluates every stage: `python -m mer_jax.main --config configs/default.py --workdir W`.

Rerunning with the same workdir resumes from its checkpoints.
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from mer_jax import errors
from mer_jax.config_validation import validate_config

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (get_config()).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where shards, checkpoints and reports go.')
_MULTIHOST = flags.DEFINE_bool(
    'multihost', False, 'Start JAX\'s distributed runtime with auto-detection (Cloud TPU pod '
    'slices: one process per host).')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', '', 'host:port of process 0, for multi-process runs elsewhere (GPU '
    'clusters, the localhost CPU test); needs --num_processes and --process_id.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', 0, 'Processes in the run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', -1, 'This process\'s index.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # keep library INFO logs out of the console
  config = errors.loaded_config(_CONFIG)
  validate_config(config)
  # Imported after validation, so a bad config fails before JAX and the models load.
  from mer_jax.run import job  # pylint: disable=g-import-not-at-top
  job.run(config, _WORKDIR.value, coordinator_address=_COORDINATOR.value,
          num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value,
          multihost=_MULTIHOST.value)

if __name__ == '__main__':
  app.run(errors.cli_main(main), flags_parser=errors.parse_flags)
