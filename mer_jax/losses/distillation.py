"""Cross-modal knowledge distillation: a student learns from labels and a frozen teacher."""

import jax
import jax.numpy as jnp
import numpy as np

from mer_jax.losses import classification

Array = jax.Array


def softened_kl_divergence(student_logits: Array, teacher_logits: Array, valid: Array, *,
                           temperature: float) -> Array:
  """KL(softmax(teacher / T) || softmax(student / T)) summed over classes, mean over valid nodes.

  This is PyTorch's KLDivLoss(reduction='batchmean') with the batch size replaced by the number
  of valid nodes. The teacher side is a constant: no gradient flows into `teacher_logits`.
  """
  if student_logits.shape != teacher_logits.shape:
    raise ValueError(f'student logits {student_logits.shape} and teacher logits '
                     f'{teacher_logits.shape} must have the same shape.')
  teacher_logits = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
  student = classification.clean_logits(student_logits.astype(jnp.float32), valid)
  teacher = classification.clean_logits(teacher_logits, valid)
  teacher_log_p = jax.nn.log_softmax(teacher / temperature, axis=-1)
  student_log_p = jax.nn.log_softmax(student / temperature, axis=-1)
  per_node = jnp.sum(jnp.exp(teacher_log_p) * (teacher_log_p - student_log_p), axis=-1)
  return classification.masked_mean(per_node, valid)


def distillation_loss(student_logits: Array,
                      teacher_logits: Array,
                      labels: Array,
                      mask: Array,
                      *,
                      temperature: float,
                      alpha: float,
                      class_weights: Array | np.ndarray | None,
                      poly_alpha: float,
                      poly_gamma: float) -> Array:
  """alpha * poly_focal(student, y) + (1 - alpha) * T^2 * KL(teacher_T || student_T).

  The T^2 factor keeps the soft-target gradients on the scale of the hard-label ones when T
  changes (Hinton et al., 2015). Both terms average over the same valid nodes (mask and
  labeled); the teacher logits get no gradient.
  """
  if temperature <= 0:
    raise ValueError(f'loss.distill_temperature must be > 0, got {temperature}.')
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f'loss.distill_alpha must be in [0, 1], got {alpha}.')
  hard = classification.poly_focal_loss(
      student_logits, labels, mask, class_weights=class_weights, poly_alpha=poly_alpha,
      poly_gamma=poly_gamma)
  valid = classification.valid_nodes(labels, mask)
  soft = softened_kl_divergence(student_logits, teacher_logits, valid, temperature=temperature)
  return alpha * hard + (1.0 - alpha) * temperature**2 * soft
