"""Vision Transformer encoder with timm/facebookresearch-mae parameter names.

Parameter tree (Flax names -> timm names, see sjmae_jax/interop):
  patch_embed/proj/{kernel (p,p,C,D), bias}   -> patch_embed.proj.{weight (D,C,p,p), bias}
                                                 (no bias with patch_bias=False)
  cls_token (1,1,D), pos_embed (1,1+L,D)       -> cls_token, pos_embed
  norm_pre (only with pre_norm=True)           -> norm_pre
  blocks_{i}/norm1, attn/qkv (fused q,k,v), attn/proj, norm2, mlp/fc1, mlp/fc2
  blocks_{i}/ls1/gamma, ls2/gamma (LayerScale, only when layer_scale_init is set)
  norm                                        -> norm
Linear kernels are (in, out); timm's weights are (out, in). qkv is fused like timm's, with the
output index laid out as (3, heads, head_dim).

`pos_embed` is a parameter initialised to the fixed 2-D sin-cos table; pretraining configs freeze
it through the optimizer (as MAE does with requires_grad=False), fine-tuning trains it (as timm).
"""
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sjmae_jax.models import posemb
from sjmae_jax.models.fused_ops import fused_gelu, fused_layer_norm  # noqa: F401 (the levers)
from sjmae_jax.models.sizes import SIZES

xavier_uniform = nn.initializers.xavier_uniform()
token_init = nn.initializers.normal(stddev=0.02)


def timm_trunc_normal(std: float):
  """timm's trunc_normal_(std=s): N(0, s^2) cut at +-2 *absolute* (so in effect untruncated)."""
  return nn.initializers.truncated_normal(std, lower=-2.0 / std, upper=2.0 / std)


def patch_kernel_init(key, shape, dtype=jnp.float32):
  """Xavier-uniform on the kernel viewed as [out, C*p*p], as MAE initialises its patch conv."""
  fan_in, fan_out = int(np.prod(shape[:-1])), shape[-1]
  limit = np.sqrt(6.0 / (fan_in + fan_out))
  return jax.random.uniform(key, shape, dtype, -limit, limit)


def torch_default_bias_init(fan_in: int):
  """PyTorch's Conv2d default bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)); MAE leaves it so."""
  bound = 1.0 / np.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def sincos_init(grid_size: int, cls_token: bool = True):
  def init(key, shape, dtype=jnp.float32):
    del key
    table = posemb.sincos_2d(shape[-1], grid_size, cls_token=cls_token)
    if table.shape != tuple(shape):
      raise ValueError(f"pos_embed shape {shape} does not match a {grid_size}x{grid_size} grid")
    return jnp.asarray(table, dtype)
  return init


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
  """(B, H, W, C) -> (B, L, p*p*C) in MAE's order (n, h, w, p, q, c)."""
  b, h, w, c = images.shape
  p = patch_size
  x = images.reshape(b, h // p, p, w // p, p, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: jax.Array, patch_size: int, channels: int) -> jax.Array:
  """Inverse of `patchify` for a square grid."""
  b, l, _ = patches.shape
  g = int(round(l ** 0.5))
  p = patch_size
  x = patches.reshape(b, g, g, p, p, channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, g * p, g * p, channels)


GATHER_IMPLS = ("take", "permute")


@jax.custom_vjp
def take_tokens(x, ids):
  """x (B, L, D), ids (B, K) distinct per row -> x[b, ids[b]] (B, K, D).

  The same values as jnp.take_along_axis, but the gradient is a gather too: each of the L input
  rows takes the cotangent of the one output row that read it (or zero), through the inverse of
  `ids`. take_along_axis's gradient is a scatter-add into (B, L, D), which XLA runs on a GPU
  with atomic adds. Used for MAE's kept tokens (K < L) and the decoder's unshuffle (K = L).
  """
  return jnp.take_along_axis(x, ids[..., None], axis=1)


def _take_tokens_fwd(x, ids):
  b, length = x.shape[:2]
  kept = ids.shape[1]
  # slot[b, l] = k where ids[b, k] = l, else `kept` (a zero row): an int scatter of B x K
  slot = jnp.full((b, length), kept, jnp.int32).at[jnp.arange(b)[:, None], ids].set(
      jnp.arange(kept, dtype=jnp.int32)[None])
  return take_tokens(x, ids), slot


def _take_tokens_bwd(slot, cotangent):
  padded = jnp.concatenate([cotangent, jnp.zeros_like(cotangent[:, :1])], axis=1)
  return jnp.take_along_axis(padded, slot[..., None], axis=1), None


take_tokens.defvjp(_take_tokens_fwd, _take_tokens_bwd)


def gather_tokens(x, ids, impl: str = "take"):
  """x[b, ids[b]] by `impl`: 'take' (jnp.take_along_axis) or 'permute' (`take_tokens`)."""
  if impl == "permute":
    return take_tokens(x, ids)
  return jnp.take_along_axis(x, ids[..., None], axis=1)


class DropPath(nn.Module):
  """Stochastic depth per sample (timm's drop_path); uses the 'dropout' rng."""
  rate: float

  @nn.compact
  def __call__(self, x, deterministic: bool):
    if deterministic or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
    return jnp.where(mask, x / keep, 0).astype(x.dtype)


class LayerScale(nn.Module):
  init_value: float

  @nn.compact
  def __call__(self, x):
    gamma = self.param("gamma", nn.initializers.constant(self.init_value), (x.shape[-1],))
    return x * gamma.astype(x.dtype)


NORM_IMPLS = ("flax", "fused", "pallas")
GELU_IMPLS = ("flax", "fused", "pallas")


class FusedLayerNorm(nn.Module):
  """nn.LayerNorm's parameters (scale, bias) and values, `fused_layer_norm`'s backward pass;
  impl='pallas': the Pallas kernels of models/pallas_norm.py where they apply (a CUDA GPU,
  power-of-two widths), `fused_layer_norm` elsewhere."""
  epsilon: float = 1e-6
  dtype: Any = jnp.float32
  impl: str = "fused"

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (d,))
    bias = self.param("bias", nn.initializers.zeros, (d,))
    dtype = jnp.result_type(x, scale, bias) if self.dtype is None else self.dtype
    if self.impl == "pallas":
      from sjmae_jax.models import pallas_norm  # pylint: disable=import-outside-toplevel (Pallas: only when asked for)
      return pallas_norm.layer_norm(x, scale, bias, self.epsilon, jnp.dtype(dtype))
    return fused_layer_norm(x, scale, bias, self.epsilon, jnp.dtype(dtype))


def layer_norm(impl: str, dtype, name: Optional[str] = None, epsilon: float = 1e-6):
  """The blocks' LayerNorm: 'flax' (nn.LayerNorm), 'fused' or 'pallas' (FusedLayerNorm)."""
  if impl in ("fused", "pallas"):
    return FusedLayerNorm(epsilon=epsilon, dtype=dtype, impl=impl, name=name)
  return nn.LayerNorm(epsilon=epsilon, dtype=dtype, name=name)


ATTENTION_IMPLS = (None, "xla", "cudnn", "auto")


def dot_product_attention(q, k, v, mask=None, implementation: Optional[str] = None):
  """jax.nn.dot_product_attention, plus implementation='auto'.

  'auto' takes cuDNN's fused (flash) attention where it applies (a CUDA GPU, bfloat16/float16,
  head_dim a multiple of 8 up to 128, or 256 from Hopper on) and XLA's everywhere else (CPU, TPU,
  float32, other shapes). None / 'xla' / 'cudnn' are passed to JAX as they are: JAX's None is
  XLA's, and 'cudnn' fails where cuDNN does not apply.
  """
  if implementation != "auto":
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)
  if jax.default_backend() == "gpu":
    try:  # JAX checks dtype, shapes and the cuDNN install while tracing, before adding anything
      return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")
    except (NotImplementedError, RuntimeError):
      pass
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")


QKV_IMPLS = ("fused", "split")


class Attention(nn.Module):
  """Multi-head self-attention with fused qkv (timm layout).

  `context` lets queries come from `x` while keys/values come from another stream (MaPeT's query
  stream); `mask` is a boolean (B, 1|H, Tq, Tk) array, True where attending is allowed.
  `attention_impl`: None / 'xla' / 'cudnn' / 'auto' (see `dot_product_attention`).
  qkv_impl 'split' (self-attention only; the same `qkv` parameters): q, k and v as three products
  with the kernel's column blocks, each written as (B, T, heads, head_dim), the layout
  jax.nn.dot_product_attention (and cuDNN) takes, instead of one (B, T, 3 * D) product whose
  three strided slices are copied out.
  """
  num_heads: int
  dtype: Any = jnp.float32
  attention_impl: Optional[str] = None
  qkv_impl: str = "fused"

  @nn.compact
  def __call__(self, x, context=None, mask=None):
    b, t, d = x.shape
    head_dim = d // self.num_heads
    qkv = nn.Dense(3 * d, dtype=self.dtype, kernel_init=xavier_uniform, name="qkv")
    proj = nn.Dense(d, dtype=self.dtype, kernel_init=xavier_uniform, name="proj")
    if self.qkv_impl == "split" and context is None:
      if self.is_initializing():  # creates qkv/{kernel,bias} as the fused path does
        qkv(x[:1, :1])
      params = qkv.variables["params"]
      dtype = self.dtype or jnp.result_type(x, params["kernel"])  # as nn.Dense promotes
      kernel = params["kernel"].astype(dtype).reshape(d, 3, self.num_heads, head_dim)
      bias = params["bias"].astype(dtype).reshape(3, self.num_heads, head_dim)
      x = x.astype(dtype)
      q, k, v = (jnp.einsum("btd,dnh->btnh", x, kernel[:, i]) + bias[i] for i in range(3))
    else:
      q, k, v = jnp.split(qkv(x).reshape(b, t, 3, self.num_heads, head_dim), 3, axis=2)
      q = q[:, :, 0]
      if context is None:
        k, v = k[:, :, 0], v[:, :, 0]
      else:
        tc = context.shape[1]
        kv = qkv(context).reshape(b, tc, 3, self.num_heads, head_dim)
        k, v = kv[:, :, 1], kv[:, :, 2]
    out = dot_product_attention(q, k, v, mask=mask, implementation=self.attention_impl)
    return proj(out.reshape(b, t, d))


ACT_LAYERS = ("gelu", "quick_gelu")


def quick_gelu(x):
  """OpenAI CLIP's GELU approximation, x * sigmoid(1.702 x) (timm's act_layer='quick_gelu')."""
  return x * jax.nn.sigmoid(1.702 * x)


class Mlp(nn.Module):
  """fc1 - activation - fc2. act_layer 'gelu' is exact (erf) unless gelu_approximate (the tanh
  form), and gelu_impl 'fused' gives it `fused_gelu`'s backward pass (same values); 'pallas'
  adds fc1's bias inside the activation, whose backward pass is then one Pallas kernel with the
  bias gradient (models/pallas_norm.py; `fused` where it does not apply); 'quick_gelu' is CLIP's
  (the gelu levers do not apply to it)."""
  hidden_dim: int
  dtype: Any = jnp.float32
  gelu_impl: str = "flax"
  gelu_approximate: bool = False
  act_layer: str = "gelu"

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    fc1 = nn.Dense(self.hidden_dim, dtype=self.dtype, kernel_init=xavier_uniform, name="fc1")
    if self.act_layer not in ACT_LAYERS:
      raise ValueError(f"act_layer {self.act_layer!r}: choose one of {list(ACT_LAYERS)}")
    if self.gelu_impl == "pallas" and self.act_layer == "gelu":
      if self.is_initializing():  # creates fc1/{kernel,bias} as the other forms do
        fc1(x[..., :1, :])
      params = fc1.variables["params"]
      dtype = self.dtype or jnp.result_type(x, params["kernel"])  # as nn.Dense promotes
      h = jnp.dot(x.astype(dtype), params["kernel"].astype(dtype))
      from sjmae_jax.models import pallas_norm  # pylint: disable=import-outside-toplevel (Pallas: only when asked for)
      x = pallas_norm.gelu_bias(h, params["bias"], self.gelu_approximate)
      return nn.Dense(d, dtype=self.dtype, kernel_init=xavier_uniform, name="fc2")(x)
    x = fc1(x)
    if self.act_layer == "quick_gelu":
      x = quick_gelu(x)
    elif self.gelu_impl == "fused":
      x = fused_gelu(x, self.gelu_approximate)
    else:
      x = nn.gelu(x, approximate=self.gelu_approximate)
    return nn.Dense(d, dtype=self.dtype, kernel_init=xavier_uniform, name="fc2")(x)


class Block(nn.Module):
  """Pre-norm transformer block (timm's Block): x + attn(norm1(x)); x + mlp(norm2(x))."""
  dim: int
  num_heads: int
  mlp_ratio: float = 4.0
  drop_path: float = 0.0
  layer_scale_init: Optional[float] = None
  dtype: Any = jnp.float32
  attention_impl: Optional[str] = None
  norm_impl: str = "flax"
  gelu_impl: str = "flax"
  gelu_approximate: bool = False
  norm_eps: float = 1e-6
  act_layer: str = "gelu"
  qkv_impl: str = "fused"

  def setup(self):
    self.norm1 = layer_norm(self.norm_impl, self.dtype, epsilon=self.norm_eps)
    self.attn = Attention(self.num_heads, dtype=self.dtype, attention_impl=self.attention_impl,
                          qkv_impl=self.qkv_impl)
    self.norm2 = layer_norm(self.norm_impl, self.dtype, epsilon=self.norm_eps)
    self.mlp = Mlp(int(self.dim * self.mlp_ratio), dtype=self.dtype, gelu_impl=self.gelu_impl,
                   gelu_approximate=self.gelu_approximate, act_layer=self.act_layer)
    self.drop = DropPath(self.drop_path)
    if self.layer_scale_init is not None:
      self.ls1 = LayerScale(self.layer_scale_init)
      self.ls2 = LayerScale(self.layer_scale_init)

  def _scale(self, name, x):
    return getattr(self, name)(x) if self.layer_scale_init is not None else x

  def __call__(self, x, *, train: bool = False, mask=None, context=None):
    """With `context`, `x` is a query stream attending over `context` (pre-normed inside)."""
    deterministic = not train
    ctx = None if context is None else self.norm1(context)
    x = x + self.drop(self._scale("ls1", self.attn(self.norm1(x), context=ctx, mask=mask)),
                      deterministic)
    return x + self.drop(self._scale("ls2", self.mlp(self.norm2(x))), deterministic)


class RematBlock(Block):
  """Block taking `train` positionally, for nn.remat(static_argnums=(2,)): remat traces keyword
  arguments, and `train` picks Python branches (drop path), so it has to be static. Call it as
  block(x, train) (mask / context by keyword)."""

  # pylint: disable-next=arguments-differ
  def __call__(self, x, train: bool = False, *, mask=None, context=None):
    return super().__call__(x, train=train, mask=mask, context=context)


class VisionTransformer(nn.Module):
  """ViT encoder. Returns all tokens (cls first) after the final LayerNorm.

  The defaults are MAE's ViT; pre_norm=True, patch_bias=False, norm_eps=1e-5 and
  act_layer='quick_gelu' make it a CLIP image tower (timm's `vit_*_clip_quickgelu_*`).

  keep_ids (B, K): indices of the patches to encode (MAE's visible set), gathered after the
    position embedding is added, so each kept token carries its own position.
  use_pos_embed=False: no position embedding on any token (SJ-MAE's jigsaw pass); a (B,) array
    of 0/1 switches it per sample.
  patch_mask (B, L) bool: True patches are replaced by `mask_token` before the position
    embedding (SimMIM / mask-tokens-before-encoder); needs use_mask_token=True.
  """
  img_size: int = 224
  patch_size: int = 16
  in_chans: int = 3
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  drop_path_rate: float = 0.0
  layer_scale_init: Optional[float] = None
  dtype: Any = jnp.float32
  attention_impl: Optional[str] = None
  remat: bool = False
  # With remat: None saves only each block's input (everything else is recomputed in the
  # backward pass); a jax.checkpoint_policies name (e.g. 'dots_with_no_batch_dims_saveable')
  # saves what that policy saves.
  remat_policy: Optional[str] = None
  final_norm: bool = True  # False for global-pool classifiers, whose fc_norm replaces `norm`
  # timm's switches for CLIP towers: a LayerNorm `norm_pre` on all tokens before the blocks,
  # a patch projection without bias, the LayerNorms' eps, the MLP activation ('gelu' or
  # 'quick_gelu', timm's act_layer names).
  pre_norm: bool = False
  patch_bias: bool = True
  norm_eps: float = 1e-6
  act_layer: str = "gelu"
  use_mask_token: bool = False  # creates `mask_token` for patch_mask (mask-before-encoder methods)
  # Fast-path levers (docs/performance.md); the defaults are the plain Flax/JAX forms.
  norm_impl: str = "flax"       # 'fused': LayerNorm with a closed-form backward (FusedLayerNorm)
  gelu_impl: str = "flax"       # 'fused': GELU whose backward saves only its input
  gelu_approximate: bool = False  # the tanh GELU (a different function; exact is the default)
  # 'permute': with keep_ids, embed only the kept patches and select with `take_tokens` (gathers
  # both ways) instead of embedding all L patches and take_along_axis (a scatter-add backward).
  gather_impl: str = "take"
  qkv_impl: str = "fused"       # 'split': q, k, v as three products (Attention)

  @property
  def grid_size(self) -> int:
    return self.img_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid_size ** 2

  def setup(self):
    p, c, d = self.patch_size, self.in_chans, self.embed_dim
    self.patch_embed = PatchEmbed(p, d, c, dtype=self.dtype, gather_impl=self.gather_impl,
                                  bias=self.patch_bias)
    self.cls_token = self.param("cls_token", token_init, (1, 1, d))
    self.pos_embed = self.param("pos_embed", sincos_init(self.grid_size), (1, 1 + self.num_patches, d))
    if self.remat:
      block_cls = nn.remat(RematBlock, static_argnums=(2,), policy=remat_policy(self.remat_policy))
    else:
      block_cls = Block
    rates = np.linspace(0.0, self.drop_path_rate, self.depth)
    self.blocks = [
        block_cls(d, self.num_heads, self.mlp_ratio, float(rates[i]), self.layer_scale_init,
                  dtype=self.dtype, attention_impl=self.attention_impl, norm_impl=self.norm_impl,
                  gelu_impl=self.gelu_impl, gelu_approximate=self.gelu_approximate,
                  norm_eps=self.norm_eps, act_layer=self.act_layer, qkv_impl=self.qkv_impl,
                  name=f"blocks_{i}")
        for i in range(self.depth)]
    if self.pre_norm:
      self.norm_pre = layer_norm(self.norm_impl, self.dtype, epsilon=self.norm_eps)
    if self.final_norm:
      self.norm = layer_norm(self.norm_impl, self.dtype, epsilon=self.norm_eps)
    if self.use_mask_token:
      self.mask_token = self.param("mask_token", token_init, (1, 1, d))

  def embed_patches(self, images, patch_mask=None):
    """Patch tokens (B, L, D) without position embedding."""
    x = self.patch_embed(images)
    if patch_mask is not None:
      if not self.use_mask_token:
        raise ValueError("patch_mask needs a VisionTransformer built with use_mask_token=True")
      x = jnp.where(patch_mask[..., None], self.mask_token.astype(x.dtype), x)
    return x

  def __call__(self, images, *, keep_ids=None, use_pos_embed: bool = True, patch_mask=None,
               train: bool = False):
    if images.shape[1] != self.img_size or images.shape[2] != self.img_size:
      raise ValueError(f"image size {images.shape[1:3]} does not match model img_size {self.img_size}")
    kept_only = keep_ids is not None and patch_mask is None and self.gather_impl == "permute"
    if kept_only:  # the kept patches' pixels and position rows are selected before embedding
      x = self.patch_embed(images, keep_ids=keep_ids)
      pos = self.pos_embed.astype(x.dtype)
      b, d = x.shape[0], self.embed_dim
      pos_patches = take_tokens(jnp.broadcast_to(pos[:, 1:], (b, self.num_patches, d)), keep_ids)
    else:
      x = self.embed_patches(images, patch_mask)
      pos = self.pos_embed.astype(x.dtype)
      pos_patches = pos[:, 1:]
    cls = jnp.broadcast_to(self.cls_token.astype(x.dtype), (x.shape[0], 1, self.embed_dim))
    if not isinstance(use_pos_embed, bool):  # per-sample switch (B,): batches SJ-MAE's two passes
      on = jnp.asarray(use_pos_embed, x.dtype)[:, None, None]
      x = x + on * pos_patches
      cls = cls + on * pos[:, :1]
    elif use_pos_embed:
      x = x + pos_patches
      cls = cls + pos[:, :1]
    if keep_ids is not None and not kept_only:
      x = jnp.take_along_axis(x, keep_ids[..., None], axis=1)
    x = jnp.concatenate([cls, x], axis=1)
    if self.pre_norm:
      x = self.norm_pre(x)
    for block in self.blocks:
      x = block(x, train) if self.remat else block(x, train=train)
    return self.norm(x) if self.final_norm else x


def remat_policy(name: Optional[str]):
  """None / '' -> None (jax.checkpoint's default: save nothing); a jax.checkpoint_policies name
  -> that policy."""
  if not name:
    return None
  policy = getattr(jax.checkpoint_policies, name, None)
  if policy is None or not callable(policy) or name.startswith("_"):
    known = sorted(n for n in dir(jax.checkpoint_policies) if not n.startswith("_"))
    raise ValueError(f"config model.remat_policy: {name!r} is not a jax.checkpoint_policies "
                     f"name (known: {known})")
  return policy


class PatchEmbed(nn.Module):
  """Patch projection (a p x p stride-p conv, with a bias unless bias=False). With keep_ids
  (B, K) only those patches are projected: their pixels are gathered (`take_tokens`) and
  multiplied by the conv kernel viewed as a (p*p*C, D) matrix, as patchify orders a patch's
  pixels (p, q, c) like the kernel's HWI."""
  patch_size: int
  embed_dim: int
  in_chans: int = 3
  dtype: Any = jnp.float32
  gather_impl: str = "take"
  bias: bool = True

  @nn.compact
  def __call__(self, images, keep_ids=None):
    p = self.patch_size
    conv = nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                   use_bias=self.bias, kernel_init=patch_kernel_init,
                   bias_init=torch_default_bias_init(p * p * self.in_chans), name="proj")
    if keep_ids is None:
      x = conv(images)
      return x.reshape(x.shape[0], -1, self.embed_dim)
    if self.is_initializing():  # creates proj/{kernel,bias?} exactly as the conv path does
      conv(images[:1, :p, :p])
    params = conv.variables["params"]
    pixels = take_tokens(patchify(images, p), keep_ids)
    kernel = params["kernel"].reshape(-1, self.embed_dim)
    x = jnp.dot(pixels.astype(self.dtype), kernel.astype(self.dtype))
    return (x + params["bias"].astype(self.dtype)) if self.bias else x


def vit_kwargs(model_config) -> dict:
  """Keyword arguments of VisionTransformer from a config's `model` block.

  `variant` names a standard size (tiny/small/base/large/huge); embed_dim/depth/num_heads given
  explicitly (non-zero) override it, so custom widths need no new variant.
  """
  variant = model_config.get("variant", "base")
  if variant not in SIZES and variant != "custom":
    raise ValueError(f"config model.variant: unknown ViT variant {variant!r}; "
                     f"choose one of {sorted(SIZES)} or 'custom'")
  dim, depth, heads = SIZES[variant][:3] if variant in SIZES else (0, 0, 0)
  dim = model_config.get("embed_dim", 0) or dim
  depth = model_config.get("depth", 0) or depth
  heads = model_config.get("num_heads", 0) or heads
  if not (dim and depth and heads):
    raise ValueError("config model: a 'custom' variant needs embed_dim, depth and num_heads")
  if dim % heads:
    raise ValueError(f"config model.embed_dim: {dim} is not divisible by model.num_heads {heads}")
  img, patch = model_config.img_size, model_config.patch_size
  if img % patch:
    raise ValueError(f"config model.img_size: {img} is not divisible by model.patch_size {patch}")
  if img <= 0 or patch <= 0:
    raise ValueError(f"config model.img_size/patch_size: must be positive, got {img}/{patch}")
  if not 0.0 <= model_config.get("drop_path_rate", 0.0) < 1.0:
    raise ValueError(f"config model.drop_path_rate: {model_config.drop_path_rate} must be in [0, 1)")
  attention_impl = model_config.get("attention_impl", "") or None
  if attention_impl not in ATTENTION_IMPLS:
    raise ValueError(f"config model.attention_impl: unknown value {attention_impl!r}; choose one "
                     f"of '' (XLA), 'xla', 'cudnn', 'auto'")
  remat_policy(model_config.get("remat_policy", "") or None)  # an unknown name fails here
  levers = fast_path_levers(model_config)
  return dict(img_size=img, patch_size=patch, in_chans=model_config.get("in_chans", 3),
              embed_dim=dim, depth=depth, num_heads=heads,
              mlp_ratio=model_config.get("mlp_ratio", 4.0),
              drop_path_rate=model_config.get("drop_path_rate", 0.0),
              layer_scale_init=model_config.get("layer_scale_init", 0.0) or None,
              attention_impl=attention_impl,
              remat=model_config.get("remat", False),
              remat_policy=model_config.get("remat_policy", "") or None,
              **levers)


# model.<key>: (allowed values, default). Defaults are today's plain forms; docs/performance.md.
LEVER_KEYS = {
    "norm_impl": (NORM_IMPLS, "flax"),
    "gelu_impl": (GELU_IMPLS, "flax"),
    "gelu_approximate": ((False, True), False),
    "gather_impl": (GATHER_IMPLS, "take"),
    "qkv_impl": (QKV_IMPLS, "fused"),
}


def fast_path_levers(model_config) -> dict:
  """The fast-path lever keys of a config's `model` block, checked: {key: value}."""
  levers = {}
  for key, (allowed, default) in LEVER_KEYS.items():
    value = model_config.get(key, default)
    if value not in allowed or type(value) is not type(default):
      raise ValueError(f"config model.{key}: unknown value {value!r}; choose one of "
                       f"{list(allowed)}")
    levers[key] = value
  return levers
