"""What fusion's inputs cost and give: the default (stacked, 3 folds), stacking on 2 folds and the
authors' raw-feature fusion (no cross-fitted encoders), embedded corpus, 5 seeds each.

  python -m mer_jax.experiments.sweep --sweep configs/sweeps/stacking_cost.py \
      --workdir /tmp/stacking_cost
"""


def get_sweep():
  return {
      'title': "Fusion's inputs and their training cost on the embedded synthetic corpus",
      'reference': 'full',
      'seeds': 5,
      'overrides': (),
      'variants': {name: f'configs/ablations.py:{name}'
                   for name in ('full', 'two_folds', 'fusion_raw')},
  }
