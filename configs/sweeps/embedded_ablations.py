"""Every ablation of configs/ablations.py on the embedded corpus, 5 seeds each.

  python -m mer_jax.experiments.sweep --sweep configs/sweeps/embedded_ablations.py \
      --workdir /tmp/ablations --parallel 2
"""

from configs import ablations


def get_sweep():
  return {
      'title': 'Ablations on the embedded synthetic corpus',
      'reference': 'full',
      'seeds': 5,
      'overrides': (),
      'variants': {name: f'configs/ablations.py:{name}' for name in ablations.VARIANTS},
  }
