import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sjmae_jax import trainer
from sjmae_jax.models.vit import VisionTransformer, patchify, unpatchify
from sjmae_jax.objectives import contrastive
from sjmae_jax.objectives.losses import softmax_cross_entropy
from tests.helpers import REPO, tiny_config

RNGS = lambda seed=0: {"params": jax.random.PRNGKey(seed), "masking": jax.random.PRNGKey(seed + 1),
                       "dropout": jax.random.PRNGKey(seed + 2)}


def random_batch(config, n=8, seed=0):
  batch = trainer.sample_batch(config, n)
  batch["images"] = jax.random.normal(jax.random.PRNGKey(seed), batch["images"].shape)
  return batch


def init_and_loss(config, batch, seed=0):
  model = trainer.build_model(config)
  variables = model.init(RNGS(seed), batch)
  (loss, metrics), _ = model.apply(variables, batch, rngs=RNGS(seed + 10), mutable=["batch_stats"])
  return model, variables, loss, metrics


# ---- numerics of the loss terms against independent numpy computations ----

def np_log_softmax(x):
  x = x - x.max(axis=1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def np_normalize(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_infonce_matches_numpy():
  rng = np.random.default_rng(0)
  z1, z2 = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
  logits = np_normalize(z1) @ np_normalize(z2).T / 0.1
  expected = -np.mean(np.diag(np_log_softmax(logits)))
  loss, acc = contrastive.infonce(jnp.asarray(z1), jnp.asarray(z2), 0.1)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(acc, np.mean(logits.argmax(1) == np.arange(6)))
  sym, _ = contrastive.symmetric_infonce(jnp.asarray(z1), jnp.asarray(z2), 0.1)
  expected_back = -np.mean(np.diag(np_log_softmax(logits.T)))
  np.testing.assert_allclose(sym, 0.5 * (expected + expected_back), rtol=1e-5)


def test_simsiam_matches_numpy_and_stops_gradient():
  rng = np.random.default_rng(1)
  p1, p2, z1, z2 = (rng.normal(size=(4, 3)) for _ in range(4))
  cos = lambda a, b: np.mean(np.sum(np_normalize(a) * np_normalize(b), axis=1))
  loss, _ = contrastive.simsiam(*(jnp.asarray(x) for x in (p1, p2, z1, z2)))
  np.testing.assert_allclose(loss, -0.5 * (cos(p1, z2) + cos(p2, z1)), rtol=1e-5)
  grad_z = jax.grad(lambda z: contrastive.simsiam(jnp.asarray(p1), jnp.asarray(p2), z, z)[0])(
      jnp.asarray(z1))
  assert np.all(np.asarray(grad_z) == 0)


def test_nt_xent_matches_numpy():
  rng = np.random.default_rng(2)
  z1, z2 = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
  z = np_normalize(np.concatenate([z1, z2]))
  total = 0.0
  for i in range(8):
    pos = (i + 4) % 8
    others = [j for j in range(8) if j != i]
    sims = np.array([z[i] @ z[j] / 0.1 for j in others])
    total += -(z[i] @ z[pos] / 0.1 - np.log(np.exp(sims).sum()))
  loss, _ = contrastive.nt_xent(jnp.asarray(z1), jnp.asarray(z2), 0.1)
  np.testing.assert_allclose(loss, total / 8, rtol=1e-5)


# ---- the jigsaw pass ----

def test_without_pos_embed_the_encoder_is_permutation_equivariant():
  """Shuffling the image's patches permutes the outputs only when no position leaks in."""
  vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=4)
  images = jax.random.normal(jax.random.PRNGKey(0), (1, 16, 16, 3))
  variables = vit.init(jax.random.PRNGKey(1), images)
  perm = jax.random.permutation(jax.random.PRNGKey(2), 16)
  shuffled = unpatchify(patchify(images, 4)[:, perm], 4, 3)
  kept = jnp.array([[3, 7, 8, 12, 0]])  # also through MAE-style gathering of a subset
  for use_pos, equivariant in [(False, True), (True, False)]:
    base = vit.apply(variables, images, use_pos_embed=use_pos)
    moved = vit.apply(variables, shuffled, use_pos_embed=use_pos)
    same = np.allclose(moved[0, 1:], base[0, 1:][perm], atol=1e-5)
    assert same == equivariant
    if equivariant:
      np.testing.assert_allclose(moved[0, 0], base[0, 0], atol=1e-5)  # cls unchanged
      subset = vit.apply(variables, shuffled, keep_ids=kept, use_pos_embed=False)
      reference = vit.apply(variables, images, keep_ids=perm[kept], use_pos_embed=False)
      np.testing.assert_allclose(subset, reference, atol=1e-5)


def test_jigsaw_targets_are_original_positions_of_kept_tokens():
  config = tiny_config("sjmae", **{"sjmae.w_mae": 0.0, "sjmae.w_con": 0.0, "model.depth": 1})
  # each patch is a constant equal to its position: a kept token's content names its position
  position_image = np.repeat(np.repeat(np.arange(16.0).reshape(4, 4), 4, 0), 4, 1)
  images = jnp.asarray(np.tile(position_image[None, None, ..., None], (4, 2, 1, 1, 3)))
  batch = {"images": images, "label": jnp.zeros(4, jnp.int32)}
  model = trainer.build_model(config)
  variables = model.init(RNGS(), batch)
  (loss, metrics), _ = model.apply(variables, batch, rngs=RNGS(5), mutable=["batch_stats"])
  # the same rng streams reproduce the pass; each kept token's content names its true position
  enc = model.bind(variables, rngs=RNGS(5), mutable=["batch_stats"])
  _, _, jig, tokens2 = enc._encode_both(images[:, 0], images[:, 1], False)
  kept_pixels = np.asarray(jnp.take_along_axis(patchify(images[:, 1], 4), jig.keep_ids[..., None], 1))
  np.testing.assert_array_equal(kept_pixels, np.asarray(jig.keep_ids)[..., None] * np.ones(48))
  expected, _ = softmax_cross_entropy(enc.jigsaw_head(tokens2[:, 1:]), jig.keep_ids)
  np.testing.assert_allclose(metrics["loss/jigsaw"], expected, rtol=1e-5)
  assert tokens2.shape[1] == 1 + 4  # 25% of 16 patches kept


# ---- composition ----

@pytest.mark.slow
def test_zero_weights_equal_mae_exactly_and_compile_to_the_same_cost():
  sj = tiny_config("sjmae", **{"sjmae.w_jigsaw": 0.0, "sjmae.w_con": 0.0})
  mae = tiny_config("mae")
  batch = random_batch(sj)
  sj_model, sj_vars, sj_loss, _ = init_and_loss(sj, batch)
  mae_model, mae_vars, mae_loss, _ = init_and_loss(mae, batch)
  assert set(sj_vars["params"]) == {"encoder", "decoder"}  # no jigsaw head, no predictor
  np.testing.assert_allclose(sj_loss, mae_loss, rtol=1e-6)
  cost = lambda model, variables: jax.jit(
      lambda v, b: jax.grad(lambda p: model.apply({"params": p}, b, rngs=RNGS())[0])(v["params"])
  ).lower(variables, batch).compile().cost_analysis()
  sj_cost, mae_cost = cost(sj_model, sj_vars), cost(mae_model, mae_vars)
  sj_cost = sj_cost[0] if isinstance(sj_cost, list) else sj_cost
  mae_cost = mae_cost[0] if isinstance(mae_cost, list) else mae_cost
  assert sj_cost["flops"] == mae_cost["flops"]


def test_per_term_curves_and_their_chance_levels():
  """Each term's curve is logged with what chance would give: retrieval among the batch (the
  contrastive term) and position among the patches (jigsaw); the total is the weighted sum."""
  config = tiny_config("sjmae")
  _, _, loss, metrics = init_and_loss(config, random_batch(config, n=8))
  assert {"loss/mae", "loss/jigsaw", "loss/contrastive", "jigsaw/top1",
          "contrastive/top1"} <= set(metrics)
  num_patches = (config.model.img_size // config.model.patch_size) ** 2
  assert float(metrics["contrastive/chance"]) == pytest.approx(1 / 8)
  assert float(metrics["jigsaw/chance"]) == pytest.approx(1 / num_patches)
  np.testing.assert_allclose(loss, sum(metrics[f"loss/{t}"] for t in
                                       ("mae", "jigsaw", "contrastive")), rtol=1e-6)


def test_batched_passes_equal_separate_passes():
  batch = random_batch(tiny_config("sjmae"))
  _, _, batched, m1 = init_and_loss(tiny_config("sjmae"), batch)
  _, _, separate, m2 = init_and_loss(tiny_config("sjmae", **{"sjmae.batch_passes": False}), batch)
  np.testing.assert_allclose(batched, separate, rtol=1e-5)
  for key in m1:
    np.testing.assert_allclose(m1[key], m2[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("term,heads", [("w_mae", {"decoder"}), ("w_jigsaw", {"jigsaw_head"}),
                                        ("w_con", {"predictor"})])
@pytest.mark.slow
def test_each_term_sends_gradients_to_its_head_and_the_encoder(term, heads):
  weights = {f"sjmae.{w}": (1.0 if w == term else 0.0) for w in ("w_mae", "w_jigsaw", "w_con")}
  config = tiny_config("sjmae", **weights)
  batch = random_batch(config)
  model = trainer.build_model(config)
  variables = model.init(RNGS(), batch)
  grads = jax.grad(lambda p: model.apply({**variables, "params": p}, batch, rngs=RNGS(3),
                                         mutable=["batch_stats"])[0][0])(variables["params"])
  assert set(grads) == {"encoder"} | heads
  for name, tree in grads.items():
    norms = {jax.tree_util.keystr(k): float(jnp.abs(v).sum())
             for k, v in jax.tree_util.tree_leaves_with_path(tree)}
    dead = [k for k, v in norms.items() if v == 0 and "pos_embed" not in k]
    if term == "w_jigsaw":  # no pos embed and no cls use in this pass: cls_token gets no signal
      dead = [k for k in dead if "cls_token" not in k]
    assert not dead, (name, dead)


def test_uncertainty_weighting():
  config = tiny_config("sjmae", **{"sjmae.weighting": "uncertainty"})
  batch = random_batch(config)
  model, variables, loss, metrics = init_and_loss(config, batch)
  log_vars = variables["params"]["loss_log_vars"]
  assert log_vars.shape == (3,) and np.all(np.asarray(log_vars) == 0)
  np.testing.assert_allclose(loss, sum(metrics[f"loss/{t}"] for t in ("mae", "jigsaw", "contrastive")),
                             rtol=1e-5)  # exp(0) L + 0
  params = dict(variables["params"], loss_log_vars=jnp.array([1.0, -0.5, 0.0]))
  (loss2, m2), _ = model.apply({**variables, "params": params}, batch, rngs=RNGS(10),
                               mutable=["batch_stats"])
  expected = (np.exp(-1) * m2["loss/mae"] + 1 + np.exp(0.5) * m2["loss/jigsaw"] - 0.5
              + m2["loss/contrastive"])
  np.testing.assert_allclose(loss2, expected, rtol=1e-5)


def test_per_slot_mask_token_is_tied_to_the_mask_ratio():
  config = tiny_config("sjmae", **{"decoder.mask_token_mode": "per_slot"})
  _, variables, loss, _ = init_and_loss(config, random_batch(config))
  assert variables["params"]["decoder"]["mask_token"].shape == (1, 12, 32)  # 16 patches, 4 kept
  assert np.isfinite(loss)


def test_predictor_batchnorm_keeps_pytorchs_unbiased_running_variance():
  """torch.nn.BatchNorm1d (the official predictor's) normalises a training batch with its biased
  variance but adds the UNBIASED one (x n / (n - 1)) to the running variance (momentum 0.1);
  evaluation normalises with the running statistics."""
  from sjmae_jax.models.heads import Predictor
  rng = np.random.default_rng(0)
  x = (3.0 * rng.normal(size=(6, 16)) + 1.0).astype(np.float32)
  pred = Predictor(8)
  variables = pred.init(jax.random.PRNGKey(0), x, train=False)
  params = jax.tree.map(np.asarray, variables["params"])
  out, updated = pred.apply(variables, x, train=True, mutable=["batch_stats"])
  stats = jax.tree.map(np.asarray, updated["batch_stats"]["bn"])
  h = x.astype(np.float64) @ params["fc1"]["kernel"]
  np.testing.assert_allclose(stats["mean"], 0.1 * h.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * h.var(0, ddof=1), rtol=1e-5)
  head = lambda z: (np.maximum(z * params["bn"]["scale"] + params["bn"]["bias"], 0)
                    @ params["fc2"]["kernel"] + params["fc2"]["bias"])
  np.testing.assert_allclose(out, head((h - h.mean(0)) / np.sqrt(h.var(0) + 1e-5)), rtol=1e-4,
                             atol=1e-5)
  evaluated = pred.apply({"params": variables["params"], "batch_stats": updated["batch_stats"]},
                         x, train=False)
  np.testing.assert_allclose(
      evaluated, head((h - stats["mean"]) / np.sqrt(stats["var"] + 1e-5)), rtol=1e-4, atol=1e-5)


SHARDED_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from sjmae_jax.objectives import contrastive
    from sjmae_jax.models.heads import Predictor
    assert jax.device_count() == 8
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "fsdp"))
    rows = NamedSharding(mesh, P(("data", "fsdp")))
    rng = np.random.default_rng(0)
    x1, x2 = rng.normal(size=(32, 16)).astype(np.float32), rng.normal(size=(32, 16)).astype(np.float32)
    pred = Predictor(8)
    variables = pred.init(jax.random.PRNGKey(0), x1, train=False)
    def loss(v, a, b):
      p1, _ = pred.apply(v, a, train=True, mutable=["batch_stats"])
      p2, _ = pred.apply(v, b, train=True, mutable=["batch_stats"])
      return contrastive.infonce(p1, p2, 0.1)[0]
    sharded = jax.jit(loss)(variables, jax.device_put(x1, rows), jax.device_put(x2, rows))
    assert len(jax.device_put(x1, rows).addressable_shards) == 8
    single = jax.jit(loss, backend="cpu")(variables, x1, x2)
    # reference: one device, whole batch, plain numpy BatchNorm statistics
    def np_pred(x):
      h = x @ np.asarray(variables["params"]["fc1"]["kernel"])
      h = (h - h.mean(0)) / np.sqrt(h.var(0) + 1e-5)
      h = np.maximum(h, 0)
      return h @ np.asarray(variables["params"]["fc2"]["kernel"]) + np.asarray(variables["params"]["fc2"]["bias"])
    n = lambda z: z / np.linalg.norm(z, axis=1, keepdims=True)
    logits = n(np_pred(x1)) @ n(np_pred(x2)).T / 0.1
    logits = logits - logits.max(1, keepdims=True)
    ref = -np.mean(np.diag(logits - np.log(np.exp(logits).sum(1, keepdims=True))))
    np.testing.assert_allclose(float(sharded), ref, rtol=1e-4)
    np.testing.assert_allclose(float(sharded), float(single), rtol=1e-5)
    print("OK", float(sharded), ref)
""")


def test_sharded_infonce_with_batchnorm_equals_global_batch_value():
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": str(REPO)}
  result = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=900)
  assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]
