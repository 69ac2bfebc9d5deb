"""LayerNorm and GELU with hand-written backward passes (model.norm_impl / gelu_impl='fused'):
the same values as flax's, fewer saved bytes. models/vit.py uses them, and models/pallas_norm.py
falls back to them where its kernels do not apply."""
import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def fused_layer_norm(x, scale, bias, epsilon: float, dtype):
  """LayerNorm over the last axis: statistics in float32, output in `dtype`.

  The forward pass is flax.linen.LayerNorm's, op for op (fast variance E[x^2] - E[x]^2, clipped
  at 0), so its values are the same. The backward pass is the closed form from the saved input
  and the per-row mean and 1/std: autodiff of flax's form saves three float32 copies of the
  activation (x, x - mean, the normalised x), this saves the input in its own dtype.
  """
  return _layer_norm_fwd(x, scale, bias, epsilon, dtype)[0]


def _layer_norm_fwd(x, scale, bias, epsilon, dtype):
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  mean2 = jnp.mean(jax.lax.square(x32), axis=-1, keepdims=True)
  rstd = jax.lax.rsqrt(jnp.maximum(0.0, mean2 - jax.lax.square(mean)) + epsilon)
  y = (x32 - mean) * (rstd * scale.astype(jnp.float32)) + bias.astype(jnp.float32)
  return y.astype(dtype), (x, mean, rstd, scale, bias)


def _layer_norm_bwd(epsilon, dtype, residuals, dy):
  del epsilon, dtype
  x, mean, rstd, scale, bias = residuals
  xhat = (x.astype(jnp.float32) - mean) * rstd
  dy = dy.astype(jnp.float32)
  rows = tuple(range(x.ndim - 1))
  dscale = jnp.sum(dy * xhat, axis=rows).astype(scale.dtype)
  dbias = jnp.sum(dy, axis=rows).astype(bias.dtype)
  g = dy * scale.astype(jnp.float32)
  dx = rstd * (g - jnp.mean(g, axis=-1, keepdims=True)
               - xhat * jnp.mean(g * xhat, axis=-1, keepdims=True))
  return dx.astype(x.dtype), dscale, dbias


fused_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def fused_gelu(x, approximate: bool = False):
  """jax.nn.gelu with a backward pass that saves only the input and recomputes the derivative
  in float32. Autodiff of the exact form saves four arrays of the hidden width (a product, erfc,
  exp and a copy of the input)."""
  return jax.nn.gelu(x, approximate=approximate)


def _gelu_fwd(x, approximate):
  return fused_gelu(x, approximate), x


def _gelu_bwd(approximate, x, dy):
  _, vjp = jax.vjp(lambda v: jax.nn.gelu(v, approximate=approximate), x.astype(jnp.float32))
  return (vjp(dy.astype(jnp.float32))[0].astype(x.dtype),)


fused_gelu.defvjp(_gelu_fwd, _gelu_bwd)
