"""Loss terms shared by objectives and evaluation (pure functions)."""
import jax
import jax.numpy as jnp


def softmax_cross_entropy(logits, labels, *, label_smoothing: float = 0.0):
  """Mean softmax cross-entropy over every leading position of logits (..., K); returns (loss,
  top-1 accuracy).

  labels: integer classes (...) or target distributions (..., K) (e.g. mixup's). With
  label_smoothing s the target is (1 - s) * target + s / K, i.e. timm's LabelSmoothingCrossEntropy
  (1 - s) * NLL + s * mean over classes of -log p. Computed in float32; logits of -inf (excluded
  classes) are fine without smoothing.
  """
  logits = logits.astype(jnp.float32)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  if jnp.issubdtype(labels.dtype, jnp.integer):
    loss = -jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]
    classes = labels
  else:
    loss = -jnp.sum(labels * log_probs, axis=-1)
    classes = jnp.argmax(labels, axis=-1)
  if label_smoothing:
    loss = (1.0 - label_smoothing) * loss + label_smoothing * -jnp.mean(log_probs, axis=-1)
  accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == classes)
  return jnp.mean(loss), accuracy
