"""Contrastive loss terms on global-batch embeddings (pure functions).

Under jit the arrays are the global (sharded) batch, so negatives come from every device.
"""
import jax
import jax.numpy as jnp

from sjmae_jax.objectives.losses import softmax_cross_entropy


def l2_normalize(x, eps: float = 1e-12):
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def infonce(z1, z2, temperature: float = 0.1):
  """One direction, SJ-MAE's form: logits = n(z1) n(z2)^T / tau, positives on the diagonal.

  Returns (loss, top-1 retrieval accuracy of the positive among the batch).
  """
  logits = l2_normalize(z1) @ l2_normalize(z2).T / temperature
  return softmax_cross_entropy(logits, jnp.arange(logits.shape[0]))


def symmetric_infonce(z1, z2, temperature: float = 0.1):
  loss12, acc12 = infonce(z1, z2, temperature)
  loss21, acc21 = infonce(z2, z1, temperature)
  return 0.5 * (loss12 + loss21), 0.5 * (acc12 + acc21)


def simsiam(p1, p2, z1, z2):
  """-0.5 (cos(p1, sg(z2)) + cos(p2, sg(z1))); accuracy = in-batch retrieval of p1 against z2."""
  cos = lambda p, z: jnp.mean(jnp.sum(l2_normalize(p) * l2_normalize(jax.lax.stop_gradient(z)), -1))
  loss = -0.5 * (cos(p1, z2) + cos(p2, z1))
  sims = l2_normalize(p1) @ l2_normalize(z2).T
  return loss, jnp.mean(jnp.argmax(sims, axis=-1) == jnp.arange(sims.shape[0]))


def nt_xent(z1, z2, temperature: float = 0.1):
  """SimCLR's NT-Xent over 2N samples: each sample's positive is its other view, 2N-2 negatives."""
  z = l2_normalize(jnp.concatenate([z1, z2], axis=0))
  n = z1.shape[0]
  logits = z @ z.T / temperature
  logits = jnp.where(jnp.eye(2 * n, dtype=bool), -jnp.inf, logits)
  positives = jnp.concatenate([jnp.arange(n, 2 * n), jnp.arange(n)])
  return softmax_cross_entropy(logits, positives)
