"""SSAT / FGCR: pure-CE limit, disjoint views, consistency term, eval top-1 monitor, digits runs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sjmae_jax import data, evaluation, optim, sharding, trainer
from sjmae_jax.evaluation.classification import ClassificationMonitor
from sjmae_jax.models.classifier import ViTClassifier
from sjmae_jax.models.vit import vit_kwargs
from sjmae_jax.objectives.ssat import cross_view_consistency, disjoint_view_maskings
from tests.helpers import load_config, tiny_config

RNGS = lambda seed=0: {"params": jax.random.PRNGKey(seed), "masking": jax.random.PRNGKey(seed + 1),
                       "dropout": jax.random.PRNGKey(seed + 2)}


def small_config(name="ssat", **overrides):
  return tiny_config(name, **{"model.depth": 1, **overrides})


def random_batch(config, n=8, seed=0):
  batch = trainer.sample_batch(config, n)
  batch["images"] = jax.random.normal(jax.random.PRNGKey(seed), batch["images"].shape)
  batch["label"] = jnp.arange(n) % 10
  return batch


def np_smoothed_ce(logits, labels, smoothing):
  logits = logits.astype(np.float64)
  log_probs = logits - logits.max(1, keepdims=True)
  log_probs -= np.log(np.exp(log_probs).sum(1, keepdims=True))
  nll = -log_probs[np.arange(len(labels)), labels]
  return np.mean((1 - smoothing) * nll - smoothing * log_probs.mean(1))


def test_config_matches_the_original_recipe():
  config = load_config("ssat", "data=cifar10")
  assert config.data.views == ["finetune"]  # RandAugment m9 + random erasing 0.25
  assert config.data.recipes.finetune.randaugment == "rand-m9-mstd0.5-inc1"
  assert config.data.recipes.finetune.random_erase_prob == 0.25
  assert (config.decoder.embed_dim, config.decoder.depth, config.decoder.num_heads) == (128, 2, 16)
  assert (config.ssat.lam, config.ssat.label_smoothing, config.ssat.mask_ratio) == (0.1, 0.1, 0.75)
  assert (config.ssat.views, config.ssat.beta, config.ssat.num_classes) == (1, 0.0, 10)
  fgcr = load_config("ssat", "variant=fgcr")
  assert (fgcr.ssat.views, fgcr.ssat.beta, fgcr.ssat.offdiag_target) == (3, 1e-3, -1.0)


def test_lambda_one_is_pure_supervised_cross_entropy():
  config = small_config(**{"ssat.lam": 1.0})
  model = trainer.build_model(config)
  batch = random_batch(config)
  variables = jax.jit(model.init)(RNGS(), batch)
  assert set(variables["params"]) == {"encoder", "head"}  # no decoder is built
  no_masking_rng = {"dropout": jax.random.PRNGKey(0)}  # fails if a masked pass were computed
  loss, metrics = jax.jit(lambda v, b: model.apply(v, b, rngs=no_masking_rng))(variables, batch)
  assert set(metrics) == {"loss/ce", "train/top1"}
  # the same params as a timm-style cls-token classifier give the same logits
  classifier = ViTClassifier(vit_kwargs(config.model), num_classes=10, global_pool="token")
  logits = np.asarray(classifier.apply(variables, batch["images"][:, 0]))
  expected = np_smoothed_ce(logits, np.asarray(batch["label"]), 0.1)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(metrics["train/top1"],
                             np.mean(logits.argmax(1) == np.asarray(batch["label"])))


@pytest.mark.parametrize("num_patches,ratio,views", [
    (16, 0.75, 1), (16, 0.75, 3), (16, 0.75, 4), (64, 0.75, 3), (49, 0.75, 3), (49, 0.75, 4),
    (64, 0.6, 2)])
def test_fgcr_views_are_disjoint_and_each_keeps_the_mae_count(num_patches, ratio, views):
  batch_size = 5
  maskings = disjoint_view_maskings(jax.random.PRNGKey(0), batch_size, num_patches, ratio, views)
  len_keep = int(num_patches * (1 - ratio))
  assert len(maskings) == views
  for b in range(batch_size):
    kept = [set(np.asarray(m.keep_ids[b]).tolist()) for m in maskings]
    assert all(len(k) == len_keep for k in kept)
    assert len(set().union(*kept)) == views * len_keep  # pairwise disjoint
    for m, k in zip(maskings, kept):
      mask, restore = np.asarray(m.mask[b]), np.asarray(m.ids_restore[b])
      assert set(np.flatnonzero(mask == 0).tolist()) == k  # removed = everything outside the view
      assert sorted(restore.tolist()) == list(range(num_patches))
      # the decoder puts the t-th kept token back at keep_ids[t]
      np.testing.assert_array_equal(restore[np.asarray(m.keep_ids[b])], np.arange(len_keep))


def test_too_many_views_fail_naming_the_key():
  with pytest.raises(ValueError, match="ssat.views"):
    disjoint_view_maskings(jax.random.PRNGKey(0), 2, 16, 0.75, 5)


def test_one_view_is_exactly_mae():
  """K=1, lambda=0: the reconstruction term is the MAE objective's loss (same masking rng)."""
  config = small_config(**{"ssat.lam": 0.0})
  mae_config = small_config("mae", **{"mae.norm_pix_loss": False})
  batch = random_batch(config)
  ssat, mae = trainer.build_model(config), trainer.build_model(mae_config)
  variables = jax.jit(ssat.init)(RNGS(), batch)
  ssat_loss, metrics = jax.jit(lambda v, b: ssat.apply(v, b, rngs=RNGS(7)))(variables, batch)
  mae_params = {k: variables["params"][k] for k in ("encoder", "decoder")}
  mae_loss, _ = jax.jit(lambda v, b: mae.apply(v, b, rngs=RNGS(7)))({"params": mae_params}, batch)
  np.testing.assert_allclose(metrics["loss/mae"], mae_loss, rtol=1e-6)
  np.testing.assert_allclose(ssat_loss, mae_loss, rtol=1e-6)


def np_fgcr_consistency(cls_views, offdiag):
  """The original loop: per view, standardise over the batch (unbiased std), correlate with the
  standardised mean over views."""
  k, n, d = cls_views.shape
  standardize = lambda z: (z - z.mean(0)) / z.std(0, ddof=1)
  anchor = standardize(cls_views.mean(0))
  total = 0.0
  for z in cls_views:
    c = standardize(z).T @ anchor / n
    on = ((np.diag(c) - 1) ** 2).sum()
    off = ((c - offdiag) ** 2)[~np.eye(d, dtype=bool)].sum()
    total += on + 0.005 * off
  return total / k


@pytest.mark.parametrize("offdiag", [-1.0, 0.0])
def test_consistency_term_matches_the_original_and_stops_gradient_at_the_mean(offdiag):
  cls_views = np.random.default_rng(0).normal(size=(3, 7, 5))
  loss = cross_view_consistency(jnp.asarray(cls_views), offdiag)
  np.testing.assert_allclose(loss, np_fgcr_consistency(cls_views, offdiag), rtol=1e-5)
  # gradient flows through each view only, not through the mean it is compared with
  anchor = jnp.asarray(cls_views.mean(0))
  frozen = lambda z: cross_view_consistency_with_anchor(z, anchor, offdiag)
  z = jnp.asarray(cls_views)
  np.testing.assert_allclose(jax.grad(lambda z: cross_view_consistency(z, offdiag))(z),
                             jax.grad(frozen)(z), rtol=1e-4, atol=1e-6)


def cross_view_consistency_with_anchor(cls_views, anchor, offdiag):
  """The term with the mean over views given as a constant."""
  n, d = cls_views.shape[1:]
  standardize = lambda z: (z - z.mean(-2, keepdims=True)) / z.std(-2, ddof=1, keepdims=True)
  c = jnp.einsum("knd,ne->kde", standardize(cls_views), standardize(anchor)) / n
  eye = jnp.eye(d)
  return jnp.mean(jnp.sum((c - 1) ** 2 * eye + 0.005 * (c - offdiag) ** 2 * (1 - eye), axis=(1, 2)))


def test_fgcr_total_loss_and_view_average():
  config = small_config(**{"ssat.views": 3, "ssat.beta": 1e-3})
  model = trainer.build_model(config)
  batch = random_batch(config)
  variables = jax.jit(model.init)(RNGS(), batch)
  loss, m = jax.jit(lambda v, b: model.apply(v, b, rngs=RNGS(3)))(variables, batch)
  expected = 0.1 * m["loss/ce"] + 0.9 * (m["loss/mae"] + 1e-3 * m["loss/consistency"])
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  # reconstruction = mean over views of each view's removed-patch MSE
  rec, cls_views, masking, pred = jax.jit(lambda v, x: model.apply(
      v, x, True, rngs=RNGS(3), method=lambda module, *a: module._masked_pass(*a)))(
          variables, batch["images"][:, 0])
  assert cls_views.shape == (3, 8, 32)
  target = np.asarray(batch["images"][:, 0])
  patches = target.reshape(8, 4, 4, 4, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(8, 16, 48)
  per_patch = ((np.asarray(pred).reshape(3, 8, 16, 48) - patches) ** 2).mean(-1)
  mask = np.asarray(masking.mask).reshape(3, 8, 16)
  per_view = [(per_patch[i] * mask[i]).sum() / mask[i].sum() for i in range(3)]
  np.testing.assert_allclose(m["loss/mae"], np.mean(per_view), rtol=1e-5)
  np.testing.assert_allclose(rec, np.mean(per_view), rtol=1e-5)


def test_classification_monitor_counts_valid_eval_examples_only():
  config = small_config()
  mesh = sharding.make_mesh(config.mesh)
  model = trainer.build_model(config)
  state = trainer.init_state(model, optim.make_optimizer(config, 1)[0], config,
                             jax.random.PRNGKey(0))
  logits_fn = lambda state, images: model.apply({"params": state["params"]}, images,
                                                method="classify")
  monitor = ClassificationMonitor(config.monitors.eval, config.data, logits_fn, mesh,
                                  batch_size=64, every_steps=7)
  top1 = monitor(state)["eval/top1"]
  # reference: all 359 test images in one padded batch, valid rows only
  whole = next(iter(data.build_eval_pipeline(config.data, split="test", global_batch_size=384)))
  logits = model.apply({"params": state["params"]}, jnp.asarray(whole["images"][:, 0]),
                       method="classify")
  valid = np.asarray(whole["valid"])
  assert valid.sum() == 359
  correct = (np.asarray(logits).argmax(1) == np.asarray(whole["label"]))[valid]
  np.testing.assert_allclose(top1, correct.mean(), rtol=1e-6)
  # declared in configs/ssat.py (every epoch); a run without a classifier cannot have one
  assert dict(config.monitors.eval) == {"type": "classification", "every_epochs": 1}
  monitors = evaluation.build_monitors(config, mesh, steps_per_epoch=1438 // 32,
                                       features_fn=lambda s, x: x, logits_fn=lambda s, x: x)
  mine = [m for m in monitors if isinstance(m, ClassificationMonitor)]
  assert len(mine) == 1 and mine[0].every_steps == 1438 // 32
  mae_config = small_config("mae")
  mae_config.monitors.knn.every_epochs = 0
  with mae_config.unlocked():
    mae_config.monitors.eval = dict(type="classification", every_epochs=1)
  with pytest.raises(ValueError, match="monitors.eval: a classification monitor needs logits"):
    evaluation.build_monitors(mae_config, mesh, steps_per_epoch=1, features_fn=lambda s, x: x)


@pytest.mark.parametrize("variant", ["ssat", "fgcr"])
@pytest.mark.slow
def test_ssat_trains_on_digits_and_reports_eval_top1(tmp_path, variant):
  # The whole (tiny) schedule: monitors report at its end, not at an early stop_at_step.
  overrides = {"epochs": 1, "batch_size": 448, "log_every_steps": 3}  # 3 steps
  if variant == "fgcr":
    overrides.update({"ssat.views": 3, "ssat.beta": 1e-3})
  summary = trainer.train_and_evaluate(small_config(**overrides), str(tmp_path))
  assert summary["step"] == summary["total_steps"] == 3
  assert 0.0 <= summary["eval/top1"] <= 1.0
  terms = ["loss/ce", "loss/mae", "train/top1"]
  if variant == "fgcr":
    terms.append("loss/consistency")
  for key in terms:
    assert np.isfinite(summary[key]), key
