"""Small heads shared by objectives (jigsaw position classifier, contrastive predictors)."""
from typing import Any

import flax.linen as nn
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


class Predictor(nn.Module):
  """SJ-MAE / SimSiam predictor: Linear(D,hidden,no bias)-BatchNorm-ReLU-Linear(hidden,out).

  BatchNorm runs over the global batch: under jit the batch axis is the whole sharded batch.
  PyTorch's momentum 0.1 is Flax's momentum 0.9; eps 1e-5 as torch's default.
  """
  hidden_dim: int = 512
  out_dim: int = 0  # 0 = input width
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    out = self.out_dim or x.shape[-1]
    x = nn.Dense(self.hidden_dim, use_bias=False, dtype=self.dtype, kernel_init=xavier_uniform,
                 name="fc1")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=jnp.float32,
                     name="bn")(x)
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
