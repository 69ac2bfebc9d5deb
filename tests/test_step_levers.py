"""The step speed levers (docs/performance.md, model.norm_impl / gelu_impl / gelu_approximate /
gather_impl / qkv_impl / cast_params_once): with all of them off the step is today's, bit for bit;
each one on gives the float32 step's loss and gradients within bfloat16's error; the custom
backward passes (and the Pallas LayerNorm kernels, in Pallas' interpreter) equal autodiff's;
parameter trees do not change."""
import functools
import hashlib
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from helpers import tiny_config
from sjmae_jax import sharding, trainer
from sjmae_jax.models import pallas_norm, vit

LEVERS = {"norm_impl": "fused", "gelu_impl": "fused", "gather_impl": "permute",
          "cast_params_once": True, "gelu_approximate": True, "qkv_impl": "split"}
EXACT_LEVERS = {k: v for k, v in LEVERS.items() if k != "gelu_approximate"}  # same function

# One step of the code before the levers (`_one_step` below, tiny configs, PRNGKey(0), batch 4;
# MAE: tag session13-base; SJ-MAE: the commit just before the levers were merged, after the
# predictor's BatchNorm became PyTorch's), loss and gradient norm as recorded on the first dev box.
SESSION13 = {
    ("mae", "float32"): ("0x1.cb10a00000000p+0", "0x1.3d155c0000000p+1", "dd768ef3cd71d99a"),
    ("mae", "bfloat16"): ("0x1.cb395e0000000p+0", "0x1.3d43640000000p+1", "ace017cacfb77a73"),
    ("sjmae", "float32"): ("0x1.c3986a0000000p+2", "0x1.173f740000000p+7", "628ed0029dd36ea9"),
    ("sjmae", "bfloat16"): ("0x1.c21efc0000000p+2", "0x1.11326a0000000p+7", "dce586015c8604a3"),
}
# XLA's CPU code depends on the processor (its vector instructions change the order of float
# additions), so the bits are pinned per processor kind: the same step computed by fdd80f2 (the
# commit before the kernel levers of issue 23) on that kind, with jax/jaxlib 0.10.2.
SESSION13_BITS = {
    ("AuthenticAMD", "no avx512"): {
        ("mae", "float32"): ("0x1.cb10a00000000p+0", "0x1.3d155c0000000p+1", "58a38aafe931240e"),
        ("mae", "bfloat16"): ("0x1.cb39800000000p+0", "0x1.3d400a0000000p+1", "b288cdc5a1194039"),
        ("sjmae", "float32"): ("0x1.c398640000000p+2", "0x1.173f5a0000000p+7", "6c6aa05893dc3252"),
        ("sjmae", "bfloat16"): ("0x1.c21efc0000000p+2", "0x1.11326c0000000p+7", "033a624cb7c63897"),
    },
}


def processor_kind() -> tuple:
  """(vendor, 'avx512' or 'no avx512') of this machine's CPU, from /proc/cpuinfo."""
  try:
    info = Path("/proc/cpuinfo").read_text()
  except OSError:
    return ("unknown", "unknown")
  vendor = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                 if line.startswith("vendor_id")), "unknown")
  flags = next((line.split(":", 1)[1].split() for line in info.splitlines()
                if line.startswith("flags")), [])
  return (vendor, "avx512" if "avx512f" in flags else "no avx512")


SESSION13_JAX = "0.10.2"


def _recording_tx():
  """An 'optimizer' that keeps the step's gradients, exactly, as its state."""
  return optax.GradientTransformation(
      lambda params: jax.tree.map(jnp.zeros_like, params),
      lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))


@functools.lru_cache(maxsize=None)
def _one_step(method: str, dtype: str, levers=()):
  """(loss, grad_norm, gradients, params) of one train step, as trainer.make_train_step runs it."""
  overrides = {f"model.{key}": value for key, value in levers}
  config = tiny_config(method, compute_dtype=dtype, batch_size=4, **overrides)
  model = trainer.build_model(config)
  mesh = sharding.make_mesh(config.mesh)
  tx = _recording_tx()
  state = trainer.init_state(model, tx, config, jax.random.PRNGKey(0))
  img = config.model.img_size
  images = np.random.default_rng(0).standard_normal(
      (4, len(config.data.views), img, img, 3)).astype(np.float32)
  batch = {"images": jnp.asarray(images), "label": jnp.zeros((4,), jnp.int32)}
  step = jax.jit(trainer.make_train_step(model, tx, lambda step: 0.0, mesh,
                                         kernel_dtype=trainer.kernel_cast_dtype(config)))
  new_state, metrics = step(state, batch)
  return (float(metrics["loss"]), float(metrics["grad_norm"]), new_state["opt_state"],
          state["params"])


def _relative_error(grads, reference) -> float:
  """||g - g_ref|| / ||g_ref|| over the whole gradient tree."""
  pairs = list(zip(jax.tree.leaves(grads), jax.tree.leaves(reference)))
  error = sum(float(jnp.sum((g.astype(jnp.float32) - r) ** 2)) for g, r in pairs)
  return (error / sum(float(jnp.sum(r ** 2)) for _, r in pairs)) ** 0.5


@pytest.mark.parametrize("method", ["mae", "sjmae"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.slow
def test_levers_off_is_the_session13_step(method, dtype):
  loss, grad_norm, grads, _ = _one_step(method, dtype)
  recorded_loss, recorded_norm, recorded_hash = SESSION13[(method, dtype)]
  np.testing.assert_allclose(loss, float.fromhex(recorded_loss), rtol=1e-5)
  np.testing.assert_allclose(grad_norm, float.fromhex(recorded_norm), rtol=1e-4)
  bits = SESSION13_BITS.get(processor_kind())
  if jax.__version__ != SESSION13_JAX or jax.default_backend() != "cpu" or bits is None:
    pytest.skip(f"bit-identity recorded with jax {SESSION13_JAX} on the CPU kinds "
                f"{sorted(SESSION13_BITS)}, not {processor_kind()} (values match above)")
  digest = hashlib.sha256(b"".join(np.asarray(g).tobytes() for g in jax.tree.leaves(grads)))
  assert (loss.hex(), grad_norm.hex(), digest.hexdigest()[:16]) == bits[(method, dtype)]


@pytest.mark.parametrize("lever", sorted(LEVERS))
@pytest.mark.slow
def test_each_lever_in_bfloat16_matches_the_float32_step(lever):
  ref_loss, _, ref_grads, ref_params = _one_step("mae", "float32")
  plain_loss, _, plain_grads, _ = _one_step("mae", "bfloat16")
  loss, _, grads, params = _one_step("mae", "bfloat16", ((lever, LEVERS[lever]),))
  # Today's bfloat16 step is ~0.6 % off float32 here; a lever may not make that notably worse.
  plain_error = _relative_error(plain_grads, ref_grads)
  assert 0 < plain_error < 0.02
  assert _relative_error(grads, ref_grads) < 1.25 * plain_error + 1e-3
  assert abs(loss - ref_loss) < 2 * abs(plain_loss - ref_loss) + 2e-3
  # The same parameter tree and initial values: checkpoints move between the settings.
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), params, ref_params))


@pytest.mark.parametrize("method", ["mae", "sjmae"])
@pytest.mark.slow
def test_exact_levers_together_compute_the_same_step(method):
  """In float32 the exact levers change only the order of roundings: the loss and gradients of
  all of them on equal the plain step's to float32 precision (a wrong custom backward pass would
  be off by far more); in bfloat16 they stay within bfloat16's error of float32."""
  ref_loss, _, ref_grads, _ = _one_step(method, "float32")
  loss, _, grads, _ = _one_step(method, "float32", tuple(sorted(EXACT_LEVERS.items())))
  assert loss == pytest.approx(ref_loss, rel=1e-6)
  assert _relative_error(grads, ref_grads) < 2e-5
  if method == "sjmae":  # (MAE's levers are checked in bfloat16 one at a time above)
    _, _, plain_bf16, _ = _one_step(method, "bfloat16")
    _, _, fast_bf16, _ = _one_step(method, "bfloat16", tuple(sorted(EXACT_LEVERS.items())))
    assert _relative_error(fast_bf16, ref_grads) < 1.25 * _relative_error(plain_bf16, ref_grads)


@pytest.mark.slow
def test_kernels_cast_once_before_gradient_accumulation():
  """With micro-batches the kernels are cast once, outside the scan, and each micro-batch's
  gradients come back in float32 before they are summed: for MAE, whose kernels are each used
  once, exactly the gradients of the per-use casts."""
  config = tiny_config("mae", compute_dtype="bfloat16", batch_size=4)
  model = trainer.build_model(config)
  mesh = sharding.make_mesh(config.mesh)
  tx = _recording_tx()
  state = trainer.init_state(model, tx, config, jax.random.PRNGKey(0))
  images = np.random.default_rng(0).standard_normal((4, 1, 16, 16, 3)).astype(np.float32)
  batch = {"images": jnp.asarray(images), "label": jnp.zeros((4,), jnp.int32)}
  grads = {}
  for kernel_dtype in (None, jnp.bfloat16):
    step = jax.jit(trainer.make_train_step(model, tx, lambda step: 0.0, mesh, 2,
                                           kernel_dtype=kernel_dtype))
    grads[kernel_dtype] = step(state, batch)[0]["opt_state"]
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads[jnp.bfloat16]))
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), grads[None],
                                   grads[jnp.bfloat16]))


# ----------------------------------------------------------------------------- the pieces

@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fused_layer_norm_is_flax_layer_norm_with_a_closed_form_backward(dtype):
  x = (3.0 + 2.0 * jax.random.normal(jax.random.PRNGKey(0), (2, 5, 64))).astype(dtype)
  cotangent = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 64))
  flax_norm = nn.LayerNorm(epsilon=1e-6, dtype=dtype)
  fused = vit.FusedLayerNorm(epsilon=1e-6, dtype=dtype)
  params = flax_norm.init(jax.random.PRNGKey(2), x)
  assert jax.tree.structure(fused.init(jax.random.PRNGKey(2), x)) == jax.tree.structure(params)
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(3), p.shape),
                        params)

  def vjp(module):
    out, pullback = jax.vjp(lambda p, v: module.apply(p, v), params, x)
    return out, pullback(cotangent.astype(out.dtype))

  (flax_out, (flax_dp, flax_dx)), (out, (dp, dx)) = vjp(flax_norm), vjp(fused)
  assert out.dtype == dtype
  np.testing.assert_array_equal(out, flax_out)  # the same forward ops
  tolerance = 1e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(dx.astype(jnp.float32), flax_dx.astype(jnp.float32),
                             rtol=tolerance, atol=tolerance)
  for key in ("scale", "bias"):
    np.testing.assert_allclose(dp["params"][key], flax_dp["params"][key], rtol=tolerance,
                               atol=tolerance * 10)


@pytest.mark.parametrize("approximate", [False, True])
def test_fused_gelu_saves_only_its_input(approximate):
  x = 3.0 * jax.random.normal(jax.random.PRNGKey(0), (4, 256))
  gelu = lambda v: jax.nn.gelu(v, approximate=approximate)
  fused = lambda v: vit.fused_gelu(v, approximate)
  np.testing.assert_array_equal(fused(x), gelu(x))
  np.testing.assert_allclose(jax.grad(lambda v: fused(v).sum())(x),
                             jax.grad(lambda v: gelu(v).sum())(x), rtol=1e-6, atol=1e-6)
  from jax._src.ad_checkpoint import saved_residuals
  bf16 = x.astype(jnp.bfloat16)
  saved = [aval for aval, _ in saved_residuals(lambda v: fused(v).sum(), bf16) if aval.shape]
  plain = [aval for aval, _ in saved_residuals(lambda v: gelu(v).sum(), bf16) if aval.shape]
  assert [a.shape for a in saved] == [(4, 256)] and len(plain) > len(saved)


@pytest.mark.parametrize("kept", [5, 16])  # MAE's kept tokens (K < L); an unshuffle (K = L)
def test_take_tokens_gradient_is_a_gather_equal_to_the_scatter(kept):
  batch, length, dim = 3, 16, 8
  x = jax.random.normal(jax.random.PRNGKey(0), (batch, length, dim))
  ids = jnp.argsort(jax.random.uniform(jax.random.PRNGKey(1), (batch, length)), axis=1)[:, :kept]
  cotangent = jax.random.normal(jax.random.PRNGKey(2), (batch, kept, dim))
  take = lambda v: jnp.take_along_axis(v, ids[..., None], axis=1)
  out, pullback = jax.vjp(lambda v: vit.take_tokens(v, ids), x)
  expected, expected_pullback = jax.vjp(take, x)
  np.testing.assert_array_equal(out, expected)
  np.testing.assert_array_equal(pullback(cotangent)[0], expected_pullback(cotangent)[0])
  # the backward pass gathers: no scatter of the activation-sized cotangent
  jaxpr = str(jax.make_jaxpr(pullback)(cotangent))
  assert "scatter-add" not in jaxpr and "gather" in jaxpr
  assert "scatter-add" in str(jax.make_jaxpr(expected_pullback)(cotangent))


@pytest.mark.parametrize("bias", [True, False])  # False: CLIP towers' patch projection
def test_patch_embedding_of_the_kept_patches_only(bias):
  embed = vit.PatchEmbed(4, 32, 3, bias=bias)
  images = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
  keep = jnp.argsort(jax.random.uniform(jax.random.PRNGKey(1), (2, 16)), axis=1)[:, :4]
  params = embed.init(jax.random.PRNGKey(2), images)
  assert set(params["params"]["proj"]) == ({"kernel", "bias"} if bias else {"kernel"})
  np.testing.assert_array_equal(  # the same parameters from the same rng, either way
      embed.init(jax.random.PRNGKey(2), images, keep_ids=keep)["params"]["proj"]["kernel"],
      params["params"]["proj"]["kernel"])
  full = jnp.take_along_axis(embed.apply(params, images), keep[..., None], axis=1)
  np.testing.assert_allclose(embed.apply(params, images, keep_ids=keep), full, rtol=1e-5,
                             atol=1e-5)


def test_lever_values_are_checked():
  config = tiny_config("mae")
  assert {k: v for k, v in vit.vit_kwargs(config.model).items() if k in vit.LEVER_KEYS} == {
      "norm_impl": "flax", "gelu_impl": "flax", "gelu_approximate": False,
      "gather_impl": "take", "qkv_impl": "fused"}
  for key, bad in (("norm_impl", "apex"), ("gelu_impl", "tanh"), ("gather_impl", "sorted"),
                   ("gelu_approximate", 1), ("qkv_impl", "packed")):
    model = ml_collections.ConfigDict(config.model.to_dict(), type_safe=False)
    model[key] = bad
    with pytest.raises(ValueError, match=f"config model.{key}: unknown value {bad!r}"):
      vit.vit_kwargs(model)
  config.model = ml_collections.ConfigDict(config.model.to_dict(), type_safe=False)
  config.model.cast_params_once = "yes"
  with pytest.raises(ValueError, match="config model.cast_params_once: 'yes'"):
    trainer.build_model(config)


# ----------------------------------------------------------------------------- Pallas LayerNorm

def _flax_layer_norm(x, scale, bias, dtype):
  return nn.LayerNorm(epsilon=1e-6, dtype=dtype).apply(
      {"params": {"scale": scale, "bias": bias}}, x)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_pallas_layer_norm_kernels_match_flax_in_the_interpreter(dtype):
  """The forward kernel and the backward kernel (dx and the scale and bias gradients in one
  pass over the rows, then a sum over the programs' partial sums) run in Pallas' interpreter:
  flax's LayerNorm values and autodiff's gradients, to float32 (bfloat16) precision. 96 rows =
  6 tiles of 16 in one program; 2 x 80 rows = 10 tiles in two programs of 5."""
  for shape in ((96, 32), (2, 80, 64)):
    x = (3.0 + 2.0 * jax.random.normal(jax.random.PRNGKey(0), shape)).astype(dtype)
    scale = 1 + 0.1 * jax.random.normal(jax.random.PRNGKey(1), shape[-1:])
    bias = 0.1 * jax.random.normal(jax.random.PRNGKey(2), shape[-1:])
    cotangent = jax.random.normal(jax.random.PRNGKey(3), shape).astype(dtype)
    assert pallas_norm.kernel_applies(shape, interpret=True)
    pallas = lambda v, s, b: pallas_norm.pallas_layer_norm(v, s, b, 1e-6, jnp.dtype(dtype), True)
    out, pullback = jax.vjp(pallas, x, scale, bias)
    expected, expected_pullback = jax.vjp(lambda v, s, b: _flax_layer_norm(v, s, b, dtype),
                                          x, scale, bias)
    assert out.dtype == dtype and out.shape == shape
    tolerance = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(out.astype(jnp.float32), expected.astype(jnp.float32),
                               rtol=tolerance, atol=tolerance)
    for got, want in zip(pullback(cotangent), expected_pullback(cotangent)):
      assert got.dtype == want.dtype
      np.testing.assert_allclose(got.astype(jnp.float32), want.astype(jnp.float32),
                                 rtol=tolerance, atol=tolerance * 20)


def test_pallas_layer_norm_falls_back_where_the_kernels_do_not_apply():
  """Off a GPU, at widths that are not powers of two and at row counts that are not a multiple
  of the tile, norm_impl='pallas' is the plain-JAX fused LayerNorm, bit for bit."""
  assert not pallas_norm.kernel_applies((96, 32))  # the CPU, without the interpreter
  assert not pallas_norm.kernel_applies((96, 768), interpret=True)  # ViT-B's width
  assert not pallas_norm.kernel_applies((50, 32), interpret=True)
  assert pallas_norm.kernel_applies((256 * 197, 512), interpret=True)  # the decoder at batch 256
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 48))
  module = vit.FusedLayerNorm(epsilon=1e-6, impl="pallas")
  params = module.init(jax.random.PRNGKey(1), x)
  assert jax.tree.structure(params) == jax.tree.structure(
      nn.LayerNorm(epsilon=1e-6).init(jax.random.PRNGKey(1), x))
  out, pullback = jax.vjp(lambda p: module.apply(p, x), params)
  fused_out, fused_pullback = jax.vjp(lambda p: vit.FusedLayerNorm(epsilon=1e-6).apply(p, x),
                                      params)
  np.testing.assert_array_equal(out, fused_out)
  jax.tree.map(np.testing.assert_array_equal, pullback(out), fused_pullback(out))


def test_split_qkv_is_the_fused_projection():
  """qkv_impl='split': the same parameters, q/k/v as three products in (B, T, heads, head_dim);
  the attention output and its gradients equal the fused projection's to float32 precision."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 32))
  fused = vit.Attention(num_heads=4)
  split = vit.Attention(num_heads=4, qkv_impl="split")
  params = fused.init(jax.random.PRNGKey(1), x)
  np.testing.assert_array_equal(split.init(jax.random.PRNGKey(1), x)["params"]["qkv"]["kernel"],
                                params["params"]["qkv"]["kernel"])
  out, pullback = jax.vjp(lambda p, v: split.apply(p, v), params, x)
  expected, expected_pullback = jax.vjp(lambda p, v: fused.apply(p, v), params, x)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
               pullback(out), expected_pullback(out))
  context = jax.random.normal(jax.random.PRNGKey(2), (2, 9, 32))  # cross-attention: fused path
  np.testing.assert_array_equal(split.apply(params, x, context=context),
                                fused.apply(params, x, context=context))


@pytest.mark.parametrize("approximate", [False, True])
def test_pallas_gelu_bias_backward_matches_autodiff_in_the_interpreter(approximate):
  """gelu(h + bias) with the backward kernel (the input gradient and the bias gradient's column
  sums in one pass) in Pallas' interpreter: autodiff's gradients to float32 precision."""
  h = 2.0 * jax.random.normal(jax.random.PRNGKey(0), (2, 48, 32))
  bias = 0.5 * jax.random.normal(jax.random.PRNGKey(1), (32,))
  cotangent = jax.random.normal(jax.random.PRNGKey(2), h.shape)
  assert pallas_norm.kernel_applies(h.shape, interpret=True)
  out, pullback = jax.vjp(
      lambda v, b: pallas_norm.pallas_gelu_bias(v, b, approximate, True), h, bias)
  expected, expected_pullback = jax.vjp(
      lambda v, b: jax.nn.gelu(v + b, approximate=approximate), h, bias)
  np.testing.assert_array_equal(out, expected)
  for got, want in zip(pullback(cotangent), expected_pullback(cotangent)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_mlp_with_pallas_gelu_is_the_fused_mlp():
  """gelu_impl='pallas': the same parameters and, where the kernel does not apply (here: the
  CPU), the fused GELU of fc1's output; values and gradients equal to float32 precision."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 16))
  fused, pallas = vit.Mlp(64, gelu_impl="fused"), vit.Mlp(64, gelu_impl="pallas")
  params = fused.init(jax.random.PRNGKey(1), x)
  jax.tree.map(np.testing.assert_array_equal, pallas.init(jax.random.PRNGKey(1), x), params)
  out, pullback = jax.vjp(lambda p, v: pallas.apply(p, v), params, x)
  expected, expected_pullback = jax.vjp(lambda p, v: fused.apply(p, v), params, x)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
               pullback(out), expected_pullback(out))


def test_pallas_levers_in_the_step_fall_back_to_the_same_function():
  """norm_impl / gelu_impl = 'pallas' through the whole float32 step on the CPU (the fallbacks:
  the kernels need a GPU, or the interpreter): the plain step's loss and gradients."""
  ref_loss, _, ref_grads, ref_params = _one_step("mae", "float32")
  loss, _, grads, params = _one_step("mae", "float32",
                                     (("gelu_impl", "pallas"), ("norm_impl", "pallas")))
  assert loss == pytest.approx(ref_loss, rel=1e-6)
  assert _relative_error(grads, ref_grads) < 2e-5
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), params, ref_params))
