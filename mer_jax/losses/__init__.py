"""Losses: poly-focal classification, distillation, multitask fusion, supervised contrastive."""

from mer_jax.losses.classification import balanced_class_weights
from mer_jax.losses.classification import class_weights_for
from mer_jax.losses.classification import label_smoothed_cross_entropy
from mer_jax.losses.classification import masked_mean
from mer_jax.losses.classification import poly_focal_loss
from mer_jax.losses.classification import valid_nodes
from mer_jax.losses.contrastive import supervised_contrastive_loss
from mer_jax.losses.distillation import distillation_loss
from mer_jax.losses.distillation import softened_kl_divergence
from mer_jax.losses.fusion import focal_weighted_main_loss
from mer_jax.losses.fusion import fusion_loss
from mer_jax.losses.fusion import normalized_aux_weights

__all__ = [
    'balanced_class_weights',
    'class_weights_for',
    'distillation_loss',
    'focal_weighted_main_loss',
    'fusion_loss',
    'label_smoothed_cross_entropy',
    'masked_mean',
    'normalized_aux_weights',
    'poly_focal_loss',
    'softened_kl_divergence',
    'supervised_contrastive_loss',
    'valid_nodes',
]
