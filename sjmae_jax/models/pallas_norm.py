"""LayerNorm as two Pallas kernels: the forward pass, and the backward pass with dx and the
scale and bias gradients in one kernel (model.norm_impl='pallas'); and the backward pass of
GELU(h + bias) with the bias gradient in one kernel (model.gelu_impl='pallas').

XLA's GPU fusion does not merge the row reductions of a LayerNorm backward (over the features,
for dx) with its column reductions (over the rows, for the parameter gradients), so it runs as
several kernels that each read the activation again. Here each program of the backward kernel
walks a run of row tiles: it reads x and dy once, writes dx, and keeps the column sums of
dy * xhat and dy in registers; one small sum over the programs finishes the parameter
gradients.

The same holds for the MLP's fc1: the bias gradient is a column sum of the GELU's input
gradient, which XLA computes in a kernel of its own that reads that gradient again; here the
kernel that writes it keeps its column sums.

Where the kernels apply: a CUDA GPU (Pallas lowers them through Triton), a feature width that is
a power of two up to MAX_WIDTH, and a row count that is a multiple of TILE_ROWS. Everywhere else
(CPU, TPU, other shapes) `layer_norm` is `fused_ops.fused_layer_norm`, the same function in plain JAX.
`interpret=True` runs the kernels in Pallas' interpreter on any backend (the CPU tests).
"""
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from sjmae_jax.models.fused_ops import fused_gelu, fused_layer_norm

TILE_ROWS = 16      # rows per tile: a power of two (Triton's tensors are)
MAX_TILES = 8       # tiles walked by one program: fewer, longer programs, fewer partial sums
MAX_WIDTH = 4096


def kernel_applies(shape, interpret: bool = False) -> bool:
  """Whether the Pallas kernels run for an activation of this shape here."""
  rows = 1
  for d in shape[:-1]:
    rows *= d
  width = shape[-1]
  fits = (width & (width - 1)) == 0 and 8 <= width <= MAX_WIDTH and rows % TILE_ROWS == 0
  return fits and (interpret or jax.default_backend() == "gpu")


def _tiles_per_program(rows: int) -> int:
  tiles = rows // TILE_ROWS
  return next(t for t in range(min(MAX_TILES, tiles), 0, -1) if tiles % t == 0)


def _compiler_params(interpret: bool):
  if interpret:
    return None
  from jax.experimental.pallas import triton as plgpu  # pylint: disable=import-outside-toplevel
  return plgpu.CompilerParams(num_warps=4)


def _forward_kernel(x_ref, scale_ref, bias_ref, y_ref, mean_ref, rstd_ref, *, epsilon, tiles):
  scale = scale_ref[...].astype(jnp.float32)
  bias = bias_ref[...].astype(jnp.float32)
  for tile in range(tiles):  # unrolled: static slices
    rows = pl.ds(tile * TILE_ROWS, TILE_ROWS)
    x = x_ref[rows, :].astype(jnp.float32)
    mean = jnp.mean(x, axis=1, keepdims=True)
    centred = x - mean
    rstd = jax.lax.rsqrt(jnp.mean(centred * centred, axis=1, keepdims=True) + epsilon)
    y_ref[rows, :] = (centred * rstd * scale + bias).astype(y_ref.dtype)
    mean_ref[rows, :] = mean
    rstd_ref[rows, :] = rstd


def _backward_kernel(x_ref, dy_ref, mean_ref, rstd_ref, scale_ref, dx_ref, dscale_ref,
                     dbias_ref, *, tiles):
  scale = scale_ref[...].astype(jnp.float32)
  dscale = jnp.zeros(scale.shape, jnp.float32)
  dbias = jnp.zeros(scale.shape, jnp.float32)
  for tile in range(tiles):
    rows = pl.ds(tile * TILE_ROWS, TILE_ROWS)
    rstd = rstd_ref[rows, :]
    xhat = (x_ref[rows, :].astype(jnp.float32) - mean_ref[rows, :]) * rstd
    dy = dy_ref[rows, :].astype(jnp.float32)
    dscale += jnp.sum(dy * xhat, axis=0, keepdims=True)
    dbias += jnp.sum(dy, axis=0, keepdims=True)
    g = dy * scale
    dx = rstd * (g - jnp.mean(g, axis=1, keepdims=True)
                 - xhat * jnp.mean(g * xhat, axis=1, keepdims=True))
    dx_ref[rows, :] = dx.astype(dx_ref.dtype)
  dscale_ref[...] = dscale
  dbias_ref[...] = dbias


def _forward(x2, scale, bias, epsilon, dtype, interpret):
  rows, width = x2.shape
  tiles = _tiles_per_program(rows)
  block = tiles * TILE_ROWS
  row_spec = pl.BlockSpec((block, width), lambda i: (i, 0))
  stat_spec = pl.BlockSpec((block, 1), lambda i: (i, 0))
  param_spec = pl.BlockSpec((1, width), lambda i: (0, 0))
  return pl.pallas_call(
      functools.partial(_forward_kernel, epsilon=epsilon, tiles=tiles),
      grid=(rows // block,), in_specs=[row_spec, param_spec, param_spec],
      out_specs=[row_spec, stat_spec, stat_spec],
      out_shape=[jax.ShapeDtypeStruct((rows, width), dtype),
                 jax.ShapeDtypeStruct((rows, 1), jnp.float32),
                 jax.ShapeDtypeStruct((rows, 1), jnp.float32)],
      compiler_params=_compiler_params(interpret), interpret=interpret,
      name="sjmae_layer_norm_fwd")(x2, scale.reshape(1, width), bias.reshape(1, width))


def _backward(x2, dy2, mean, rstd, scale, interpret):
  rows, width = x2.shape
  tiles = _tiles_per_program(rows)
  block = tiles * TILE_ROWS
  programs = rows // block
  row_spec = pl.BlockSpec((block, width), lambda i: (i, 0))
  stat_spec = pl.BlockSpec((block, 1), lambda i: (i, 0))
  param_spec = pl.BlockSpec((1, width), lambda i: (0, 0))
  partial_spec = pl.BlockSpec((1, width), lambda i: (i, 0))
  dx, dscale, dbias = pl.pallas_call(
      functools.partial(_backward_kernel, tiles=tiles),
      grid=(programs,), in_specs=[row_spec, row_spec, stat_spec, stat_spec, param_spec],
      out_specs=[row_spec, partial_spec, partial_spec],
      out_shape=[jax.ShapeDtypeStruct((rows, width), x2.dtype),
                 jax.ShapeDtypeStruct((programs, width), jnp.float32),
                 jax.ShapeDtypeStruct((programs, width), jnp.float32)],
      compiler_params=_compiler_params(interpret), interpret=interpret,
      name="sjmae_layer_norm_bwd")(x2, dy2, mean, rstd, scale.reshape(1, width))
  return dx, jnp.sum(dscale, axis=0), jnp.sum(dbias, axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def pallas_layer_norm(x, scale, bias, epsilon: float, dtype, interpret: bool = False):
  """LayerNorm over the last axis through the Pallas kernels (the caller checks
  `kernel_applies`): float32 statistics (two-pass variance), output in `dtype`."""
  return _pallas_fwd(x, scale, bias, epsilon, dtype, interpret)[0]


def _pallas_fwd(x, scale, bias, epsilon, dtype, interpret):
  x2 = x.reshape(-1, x.shape[-1])
  y, mean, rstd = _forward(x2, scale, bias, epsilon, dtype, interpret)
  return y.reshape(x.shape[:-1] + (y.shape[-1],)), (x2, mean, rstd, scale, bias, x.shape)


def _pallas_bwd(epsilon, dtype, interpret, residuals, dy):
  del epsilon, dtype
  x2, mean, rstd, scale, bias, shape = residuals
  dx, dscale, dbias = _backward(x2, dy.reshape(x2.shape[0], -1), mean, rstd, scale, interpret)
  return dx.reshape(shape), dscale.astype(scale.dtype), dbias.astype(bias.dtype)


pallas_layer_norm.defvjp(_pallas_fwd, _pallas_bwd)


def layer_norm(x, scale, bias, epsilon: float, dtype, interpret: bool = False):
  """The Pallas kernels where they apply (kernel_applies), else fused_ops.fused_layer_norm."""
  if kernel_applies(x.shape, interpret):
    return pallas_layer_norm(x, scale, bias, epsilon, dtype, interpret)
  return fused_layer_norm(x, scale, bias, epsilon, dtype)


# ----------------------------------------------------------------------------- GELU + bias

def _gelu_bias_backward_kernel(h_ref, bias_ref, dy_ref, dh_ref, dbias_ref, *, tiles,
                               approximate):
  bias = bias_ref[...].astype(jnp.float32)
  dbias = jnp.zeros(bias.shape, jnp.float32)
  for tile in range(tiles):
    rows = pl.ds(tile * TILE_ROWS, TILE_ROWS)
    pre = h_ref[rows, :].astype(jnp.float32) + bias
    dy = dy_ref[rows, :].astype(jnp.float32)
    dh = dy * _gelu_derivative(pre, approximate)
    dbias += jnp.sum(dh, axis=0, keepdims=True)
    dh_ref[rows, :] = dh.astype(dh_ref.dtype)
  dbias_ref[...] = dbias


def _gelu_derivative(x, approximate: bool):
  """d gelu(x) / dx in float32 (jax.nn.gelu's two forms)."""
  if approximate:
    c = 0.7978845608028654  # sqrt(2 / pi)
    inner = c * (x + 0.044715 * x * x * x)
    t = jnp.tanh(inner)
    return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * 0.044715 * x * x)
  cdf = 0.5 * (1 + _erf(x * 0.7071067811865476))
  return cdf + x * jnp.exp(-0.5 * x * x) * 0.3989422804014327  # + x * pdf(x)


def _erf(x):
  """erf in float32 from Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7): Pallas' Triton lowering
  has no erf (jax 0.10)."""
  a = jnp.abs(x)
  t = 1.0 / (1.0 + 0.3275911 * a)
  poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027
                                                                         + t * 1.061405429))))
  value = 1.0 - poly * jnp.exp(-a * a)
  return jnp.where(x < 0, -value, value)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def pallas_gelu_bias(h, bias, approximate: bool = False, interpret: bool = False):
  """gelu(h + bias) (jax.nn.gelu, in h's dtype) whose backward pass is one Pallas kernel: the
  input gradient and the column sums that make the bias gradient (the caller checks
  `kernel_applies`)."""
  return jax.nn.gelu(h + bias.astype(h.dtype), approximate=approximate)


def _gelu_bias_fwd(h, bias, approximate, interpret):
  return pallas_gelu_bias(h, bias, approximate, interpret), (h, bias)


def _gelu_bias_bwd(approximate, interpret, residuals, dy):
  h, bias = residuals
  h2 = h.reshape(-1, h.shape[-1])
  rows, width = h2.shape
  tiles = _tiles_per_program(rows)
  block = tiles * TILE_ROWS
  programs = rows // block
  row_spec = pl.BlockSpec((block, width), lambda i: (i, 0))
  dh, dbias = pl.pallas_call(
      functools.partial(_gelu_bias_backward_kernel, tiles=tiles, approximate=approximate),
      grid=(programs,),
      in_specs=[row_spec, pl.BlockSpec((1, width), lambda i: (0, 0)), row_spec],
      out_specs=[row_spec, pl.BlockSpec((1, width), lambda i: (i, 0))],
      out_shape=[jax.ShapeDtypeStruct((rows, width), h.dtype),
                 jax.ShapeDtypeStruct((programs, width), jnp.float32)],
      compiler_params=_compiler_params(interpret), interpret=interpret,
      name="sjmae_gelu_bias_bwd")(h2, bias.astype(h.dtype).reshape(1, width),
                                  dy.reshape(rows, width))
  return dh.reshape(h.shape), jnp.sum(dbias, axis=0).astype(bias.dtype)


pallas_gelu_bias.defvjp(_gelu_bias_fwd, _gelu_bias_bwd)


def gelu_bias(h, bias, approximate: bool = False, interpret: bool = False):
  """gelu(h + bias): the Pallas backward kernel where it applies (kernel_applies), else
  fused_ops.fused_gelu of h + bias (autodiff sums the bias gradient)."""
  if kernel_applies(h.shape, interpret):
    return pallas_gelu_bias(h, bias, approximate, interpret)
  return fused_gelu(h + bias.astype(h.dtype), approximate)
