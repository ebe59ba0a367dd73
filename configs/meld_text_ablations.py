"""The ablations that apply to real MELD's text-only path, one command each.

  python -m mer_jax.main --config configs/meld_text_ablations.py:fusion --workdir /tmp/meld_fusion

The argument is `<variant>[,<meld_text arg>]` (e.g. `fusion,context`); without a meld_text arg
the base is `utterance` (layers 1-6 without the dialogue GRU), on which the results page measured
them (docs/results/meld_text.md) and which scope_batch needs (the GRU reads whole dialogues).
Variants:

  teacher          the graph text teacher alone (configs/meld_text.py)
  fusion           teacher, then the fusion model over the text modality (stacked input)
  fusion_graph     fusion on the teacher's graph representations
  fusion_raw       fusion on the text features themselves
  no_gates         fusion without gates
  moe              fusion with mixture-of-experts projections
  scope_batch      the teacher's graphs over shuffled minibatches (the authors')
  loss_ce          teacher trained with plain cross-entropy
  loss_poly_focal  teacher trained with the class-weighted poly-focal loss only (its default
                   loss; kept so both loss rows exist in the text table)

Cross-modal attention, distillation and modality subsets need audio or video: not applicable.
The sweep over seeds is configs/sweeps/meld_text.py.
"""

import ml_collections

from configs import ablations
from configs import meld_text

FUSION_VARIANTS = ('fusion', 'fusion_graph', 'fusion_raw', 'no_gates', 'moe')
VARIANTS = ('teacher', *FUSION_VARIANTS, 'scope_batch', 'loss_ce', 'loss_poly_focal')
BASE_ARG = 'utterance'  # configs/meld_text.py's variant under the ablations unless one is given


def get_config(arg=None) -> ml_collections.ConfigDict:
  variant, base_arg = ablations.split_arg(arg or 'teacher')
  if variant not in VARIANTS:
    raise ValueError(f'unknown MELD text ablation {variant!r}; use one of {VARIANTS}')
  c = meld_text.get_config(base_arg or BASE_ARG)
  if variant in FUSION_VARIANTS:
    c.train.stages = ('teacher', 'fusion')
    c.optim.fusion.lr = 5e-4  # the authors' 1.5e-5 is tuned for 1024-d inputs
    if variant != 'fusion':
      ablations.apply_variant(c, variant)
  elif variant != 'teacher':
    ablations.apply_variant(c, variant)
  return c
