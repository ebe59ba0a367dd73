"""Trains and evaluates every stage: `python -m mer_jax.main --config configs/default.py --workdir W`.

Rerunning with the same workdir resumes from its checkpoints.
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

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
  config = _CONFIG.value
  validate_config(config)
  from mer_jax.train import cpu_threefry  # pylint: disable=g-import-not-at-top
  from mer_jax.train import host_memory  # pylint: disable=g-import-not-at-top
  host_memory.keep_freed_blocks_in_heap()
  cpu_threefry.unroll_threefry_on_cpu()
  # Imported after validation so a bad config fails before JAX starts.
  from mer_jax.train import distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                         auto=_MULTIHOST.value)
  from mer_jax.train import preemption  # pylint: disable=g-import-not-at-top
  from mer_jax.train import trainer  # pylint: disable=g-import-not-at-top
  preemption.run_preemptible(trainer.train_and_evaluate, config, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
