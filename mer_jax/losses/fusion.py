"""Multitask objective of the fusion model: main head plus one auxiliary head per modality."""

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mer_jax.losses import classification

Array = jax.Array


def focal_weighted_main_loss(logits: Array, labels: Array, mask: Array, *,
                             class_weights: Array | np.ndarray | None, poly_alpha: float,
                             poly_gamma: float, focal_gamma: float, main_focal_share: float,
                             label_smoothing: float) -> Array:
  """share * mean(poly_focal_n * (1 - p_t,n)^focal_gamma) + (1 - share) * smoothed CE.

  The focal factor uses p_t without gradient and multiplies each node's poly-focal loss before
  the mean. (The authors multiply the already averaged scalar loss by the per-node factors, so
  there the factor only rescales the batch loss by the batch's mean focal weight.)
  """
  if not 0.0 <= main_focal_share <= 1.0:
    raise ValueError(f'loss.main_focal_share must be in [0, 1], got {main_focal_share}.')
  per_node = classification.poly_focal_loss(
      logits, labels, mask, class_weights=class_weights, poly_alpha=poly_alpha,
      poly_gamma=poly_gamma, reduce=False)
  valid = classification.valid_nodes(labels, mask)
  clean = classification.clean_logits(logits.astype(jnp.float32), valid)
  p_true = jnp.exp(classification.true_class_log_prob(
      clean, classification.safe_labels(labels, valid)))
  focal_factor = jax.lax.stop_gradient(jnp.clip(1.0 - p_true, 0.0, 1.0)**focal_gamma)
  focal = classification.masked_mean(per_node * focal_factor, valid)
  smoothed = classification.label_smoothed_cross_entropy(
      logits, labels, mask, label_smoothing=label_smoothing)
  return main_focal_share * focal + (1.0 - main_focal_share) * smoothed


def normalized_aux_weights(aux_weights: Mapping[str, float], modalities: Sequence[str],
                           main_weight: float) -> dict[str, float]:
  """Aux weights of the modalities in use, rescaled to sum to 1 - main_weight (as the authors).

  All-zero weights stay zero.
  """
  if not 0.0 <= main_weight <= 1.0:
    raise ValueError(f'loss.main_weight must be in [0, 1], got {main_weight}.')
  missing = [m for m in modalities if m not in aux_weights]
  if missing:
    raise ValueError(f'loss.aux_weights has no entry for modalities {missing}; '
                     f'it has {sorted(aux_weights)}.')
  raw = {m: float(aux_weights[m]) for m in modalities}
  negative = {m: w for m, w in raw.items() if w < 0}
  if negative:
    raise ValueError(f'loss.aux_weights must be >= 0, got {negative}.')
  total = sum(raw.values())
  if total <= 0:
    return raw
  return {m: w * (1.0 - main_weight) / total for m, w in raw.items()}


def fusion_loss(main_logits: Array,
                aux_logits: Mapping[str, Array],
                labels: Array,
                mask: Array,
                log_vars: Array | None,
                *,
                modalities: Sequence[str],
                class_weights: Array | np.ndarray | None,
                poly_alpha: float,
                poly_gamma: float,
                focal_gamma: float,
                main_focal_share: float,
                label_smoothing: float,
                use_uncertainty: bool,
                main_weight: float,
                aux_weights: Mapping[str, float],
                aux_masks: Mapping[str, Array] | None = None) -> tuple[Array, dict[str, Array]]:
  """Main loss plus auxiliary per-modality losses, combined with fixed or learned weights.

  Main task: `focal_weighted_main_loss`. Auxiliary task m: poly-focal loss of `aux_logits[m]`,
  over the nodes where modality m is present when `aux_masks` is given.

  With `use_uncertainty`, total = sum_task exp(-s_task) * L_task + s_task (Kendall et al.,
  2018), where s = `log_vars` [1 + M] in the order (main, *modalities); s must be a trainable
  parameter of the caller (the authors never hand it to their optimizer). Otherwise
  total = main_weight * L_main + sum_m w_m * L_m with the aux weights rescaled to sum to
  1 - main_weight over `modalities`.

  Returns:
    (total, parts): parts['main'], parts['aux_<m>'] are the task losses and
    parts['weight_main'], parts['weight_aux_<m>'] their effective weights (exp(-s) with
    uncertainty weighting), all scalars.
  """
  modalities = tuple(modalities)
  missing = [m for m in modalities if m not in aux_logits]
  if missing:
    raise ValueError(f'aux_logits has no logits for modalities {missing}; '
                     f'it has {sorted(aux_logits)}.')
  if aux_masks is not None:
    missing = [m for m in modalities if m not in aux_masks]
    if missing:
      raise ValueError(f'aux_masks has no mask for modalities {missing}; '
                       f'it has {sorted(aux_masks)}.')

  task_losses = {'main': focal_weighted_main_loss(
      main_logits, labels, mask, class_weights=class_weights, poly_alpha=poly_alpha,
      poly_gamma=poly_gamma, focal_gamma=focal_gamma, main_focal_share=main_focal_share,
      label_smoothing=label_smoothing)}
  for m in modalities:
    aux_mask = mask if aux_masks is None else jnp.logical_and(mask, aux_masks[m])
    task_losses[f'aux_{m}'] = classification.poly_focal_loss(
        aux_logits[m], labels, aux_mask, class_weights=class_weights, poly_alpha=poly_alpha,
        poly_gamma=poly_gamma)

  if use_uncertainty:
    if log_vars is None or jnp.shape(log_vars) != (1 + len(modalities),):
      shape = None if log_vars is None else jnp.shape(log_vars)
      raise ValueError(f'log_vars must have shape ({1 + len(modalities)},) = (main, '
                       f'*{modalities}) when loss.use_uncertainty is set, got {shape}.')
    log_vars = jnp.asarray(log_vars, jnp.float32)
    weights = {task: jnp.exp(-log_vars[i]) for i, task in enumerate(task_losses)}
    total = sum(weights[t] * task_losses[t] + log_vars[i] for i, t in enumerate(task_losses))
  else:
    aux = normalized_aux_weights(aux_weights, modalities, main_weight)
    weights = {'main': jnp.float32(main_weight)}
    weights.update({f'aux_{m}': jnp.float32(aux[m]) for m in modalities})
    total = sum(weights[t] * task_losses[t] for t in task_losses)

  parts = dict(task_losses)
  parts.update({f'weight_{t}': w for t, w in weights.items()})
  return total, parts
