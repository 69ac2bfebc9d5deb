"""Small heads shared by objectives (jigsaw position classifier, contrastive predictors)."""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sjmae_jax.models.vit import xavier_uniform


class JigsawHead(nn.Module):
  """Jigsaw-ViT position head: Linear(D,D)-ReLU-Linear(D,D)-ReLU-Linear(D,L) on each patch token."""
  num_positions: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens):
    d = tokens.shape[-1]
    x = nn.relu(nn.Dense(d, dtype=self.dtype, kernel_init=xavier_uniform, name="fc1")(tokens))
    x = nn.relu(nn.Dense(d, dtype=self.dtype, kernel_init=xavier_uniform, name="fc2")(x))
    return nn.Dense(self.num_positions, dtype=self.dtype, kernel_init=xavier_uniform, name="fc3")(x)


class BatchNorm(nn.Module):
  """torch.nn.BatchNorm1d over all axes but the last (flax.linen.BatchNorm's variable names).

  Training normalises with the batch mean and biased variance, as both libraries do, but the
  running variance takes the UNBIASED batch variance (x n / (n - 1)) as PyTorch's does; Flax's
  BatchNorm keeps the biased one. `momentum` is PyTorch's (weight of the new batch). Under jit the
  batch axis is the global (sharded) batch. Computed in float32.
  """
  momentum: float = 0.1
  epsilon: float = 1e-5
  use_scale: bool = True
  use_bias: bool = True

  @nn.compact
  def __call__(self, x, *, train: bool):
    features = x.shape[-1]
    x = x.astype(jnp.float32)
    running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
    running_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
    if train:
      axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(x, axes)
      var = jnp.mean(jnp.square(x - mean), axes)
      if not self.is_initializing():
        count = x.size // features
        unbiased = var * (count / max(count - 1, 1))
        running_mean.value = (1 - self.momentum) * running_mean.value + self.momentum * mean
        running_var.value = (1 - self.momentum) * running_var.value + self.momentum * unbiased
    else:
      mean, var = running_mean.value, running_var.value
    y = (x - mean) * jax.lax.rsqrt(var + self.epsilon)
    if self.use_scale:
      y = y * self.param("scale", nn.initializers.ones, (features,), jnp.float32)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
    return y


class Predictor(nn.Module):
  """SJ-MAE / SimSiam predictor: Linear(D,hidden,no bias)-BatchNorm-ReLU-Linear(hidden,out).

  BatchNorm1d as PyTorch's (BatchNorm above: global batch, unbiased running variance, momentum
  0.1, eps 1e-5).
  """
  hidden_dim: int = 512
  out_dim: int = 0  # 0 = input width
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    out = self.out_dim or x.shape[-1]
    x = nn.Dense(self.hidden_dim, use_bias=False, dtype=self.dtype, kernel_init=xavier_uniform,
                 name="fc1")(x)
    x = BatchNorm(name="bn")(x, train=train)
    x = nn.relu(x)
    return nn.Dense(out, dtype=self.dtype, kernel_init=xavier_uniform, name="fc2")(x)


class ProjectionMLP(nn.Module):
  """CAN's projector: Linear(D,D)-ReLU-Linear(D,out)."""
  out_dim: int = 128
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    x = nn.relu(nn.Dense(d, dtype=self.dtype, kernel_init=xavier_uniform, name="fc1")(x))
    return nn.Dense(self.out_dim, dtype=self.dtype, kernel_init=xavier_uniform, name="fc2")(x)
