"""Jigsaw term (Jigsaw-ViT): predict each kept patch token's original position, no pos embed."""
import jax
import jax.numpy as jnp


def position_cross_entropy(logits, positions):
  """Mean cross-entropy over all kept tokens; returns (loss, top-1 position accuracy)."""
  logits = logits.astype(jnp.float32)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  loss = -jnp.mean(jnp.take_along_axis(log_probs, positions[..., None], axis=-1))
  accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == positions)
  return loss, accuracy
