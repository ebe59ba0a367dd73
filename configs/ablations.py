"""Ablations of the full system as config variants, one command each.

  python -m mer_jax.main --config configs/ablations.py:no_gates --workdir /tmp/abl_no_gates
  python -m mer_jax.main --config configs/ablations.py:t+a,runlocal --workdir /tmp/abl_ta

The argument is `<variant>[,<base arg>]`: the variant applied to configs/default.py (the embedded
corpus) with that base argument (`runlocal` or `tiny` shrink it). The sweep that runs them all
over seeds is configs/sweeps/embedded_ablations.py. Variants:

  full                the default system (teacher, distilled students, stacked fusion)
  no_distill          students learn from labels only
  no_cross_attention  fusion without cross-modal attention
  no_gates            fusion without feature/information/context gates
  moe                 fusion projections as a top-k mixture of experts (default: MLP)
  t a v t+a t+v a+v   the system restricted to those modalities (encoders of those modalities,
                      fusion over them); without t there is no teacher, so no distillation
  scope_batch         graphs over the authors' shuffled minibatches of 16 utterances
  fusion_graph        fusion reads the frozen encoders' graph representations
  fusion_raw          fusion reads the raw features (the authors' choice)
  two_folds           stacked fusion's encoders cross-fitted on 2 folds of the training
                      dialogues (default 3): each encoder trains three times instead of four
  loss_ce             plain cross-entropy everywhere (no class weights, poly, focal, smoothing,
                      auxiliary heads or uncertainty weights)
  loss_poly_focal     class-weighted poly-focal loss everywhere, without the fusion loss's
                      smoothing, auxiliary heads and uncertainty weights
"""

import ml_collections

from configs import default
from mer_jax import stages

MODALITY_SUBSETS = ('t', 'a', 'v', 't+a', 't+v', 'a+v')


def restrict_modalities(c: ml_collections.ConfigDict, modalities: tuple[str, ...]) -> None:
  c.data.modalities = modalities
  c.train.stages = stages.stages_for(modalities)
  if 't' not in modalities:
    c.loss.distill = False


def plain_cross_entropy(c: ml_collections.ConfigDict) -> None:
  c.loss.class_weights = 'none'
  c.loss.poly_alpha = 0.0
  fusion_main_only(c, focal_share=0.0)


def poly_focal_only(c: ml_collections.ConfigDict) -> None:
  fusion_main_only(c, focal_share=1.0)


def fusion_main_only(c: ml_collections.ConfigDict, focal_share: float) -> None:
  """Fusion trains its main head alone with `focal_share` of the focal-weighted poly loss."""
  c.loss.main_focal_share = focal_share
  c.loss.label_smoothing = 0.0
  c.loss.use_uncertainty = False
  c.loss.main_weight = 1.0
  c.loss.contrastive = False


def apply_variant(c: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
  """Applies one named ablation to config `c` in place and returns it."""
  fusion = c.model.fusion
  if variant == 'full':
    pass
  elif variant == 'no_distill':
    c.loss.distill = False
  elif variant == 'no_cross_attention':
    fusion.cross_attention = False
  elif variant == 'no_gates':
    fusion.gates = False
  elif variant == 'moe':
    fusion.use_moe = True
  elif variant in MODALITY_SUBSETS:
    restrict_modalities(c, tuple(variant.split('+')))
  elif variant == 'scope_batch':
    c.graph.scope = 'batch'
  elif variant == 'fusion_graph':
    fusion.input = 'graph'
  elif variant == 'fusion_raw':
    fusion.input = 'raw'
  elif variant == 'two_folds':
    fusion.stacking_folds = 2
  elif variant == 'loss_ce':
    plain_cross_entropy(c)
  elif variant == 'loss_poly_focal':
    poly_focal_only(c)
  else:
    raise ValueError(f'unknown ablation {variant!r}; use one of {VARIANTS}')
  return c


VARIANTS = ('full', 'no_distill', 'no_cross_attention', 'no_gates', 'moe', *MODALITY_SUBSETS,
            'scope_batch', 'fusion_graph', 'fusion_raw', 'two_folds', 'loss_ce',
            'loss_poly_focal')


def split_arg(arg) -> tuple[str, str | None]:
  variant, _, base_arg = (arg or 'full').partition(',')
  return variant, (base_arg or None)


def get_config(arg=None) -> ml_collections.ConfigDict:
  variant, base_arg = split_arg(arg)
  return apply_variant(default.get_config(base_arg), variant)
