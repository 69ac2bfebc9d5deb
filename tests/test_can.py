"""CAN: NT-Xent on mean tokens, denoising branch, sigma embedding, weights, a short digits run."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sjmae_jax import trainer
from sjmae_jax.models.vit import patchify
from sjmae_jax.objectives.can import sinusoidal_embedding
from tests.helpers import tiny_config

RNGS = lambda seed=0: {"params": jax.random.PRNGKey(seed), "masking": jax.random.PRNGKey(seed + 1),
                       "dropout": jax.random.PRNGKey(seed + 2), "noise": jax.random.PRNGKey(seed + 3)}


def small_config(**overrides):
  return tiny_config("can", **{"model.depth": 1, **overrides})


def random_batch(config, n=6, seed=0):
  batch = trainer.sample_batch(config, n)
  batch["images"] = jax.random.normal(jax.random.PRNGKey(seed), batch["images"].shape)
  return batch


def apply_terms(model, variables, images, seed=10):
  """Jitted `_terms` (losses, metrics, details) of one training pass under fixed rngs."""
  terms = lambda v, x: model.apply(v, x, True, rngs=RNGS(seed),
                                   method=lambda module, *a: module._terms(*a))
  return jax.jit(terms)(variables, images)


def run_terms(config, batch):
  model = trainer.build_model(config)
  variables = jax.jit(model.init)(RNGS(), batch)
  losses, metrics, details = apply_terms(model, variables, batch["images"])
  return dict(config=config, batch=batch, model=model, variables=variables, losses=losses,
              details=details)


@pytest.fixture(scope="module")
def run():
  """The default config's pass, and the module's own (loss, metrics) under the same rngs."""
  config = small_config()
  result = run_terms(config, random_batch(config))
  result["loss"], result["metrics"] = jax.jit(
      lambda v, b: result["model"].apply(v, b, rngs=RNGS(10)))(result["variables"], result["batch"])
  return result


def np_nt_xent(z1, z2, tau):
  """SimCLR's loss written out: every one of the 2N samples is an anchor, its other view the
  positive, the other 2N-2 samples the negatives."""
  z = np.concatenate([z1, z2]).astype(np.float64)
  z = z / np.linalg.norm(z, axis=1, keepdims=True)
  n2 = len(z)
  total = 0.0
  for i in range(n2):
    positive = (i + n2 // 2) % n2
    others = [j for j in range(n2) if j != i]
    denominator = np.sum(np.exp([z[i] @ z[j] / tau for j in others]))
    total += -(z[i] @ z[positive] / tau - np.log(denominator))
  return total / n2


@pytest.mark.slow
def test_contrastive_term_is_nt_xent_on_the_mean_of_all_tokens(run):
  details = run["details"]
  bound = run["model"].bind(run["variables"])
  tokens = bound.encoder(details["inputs"], keep_ids=details["masking"].keep_ids, train=True)
  assert tokens.shape == (12, 1 + 4, 32)  # 2N images, cls + 25% of 16 patches
  z = np.asarray(bound.projector(tokens.mean(axis=1)))  # cls included
  assert z.shape == (12, 128)
  expected = np_nt_xent(z[:6], z[6:], 0.1)
  np.testing.assert_allclose(run["losses"]["contrastive"], expected, rtol=1e-5)
  np.testing.assert_allclose(run["metrics"]["loss/contrastive"], expected, rtol=1e-5)


def test_views_are_masked_independently(run):
  keep = np.asarray(run["details"]["masking"].keep_ids)
  assert not np.array_equal(np.sort(keep[:6], 1), np.sort(keep[6:], 1))


def test_noise_is_added_before_the_encoder_and_is_the_mae_target(run):
  images, details = run["batch"]["images"], run["details"]
  views = np.concatenate([images[:, 0], images[:, 1]])
  sigma, noise = np.asarray(details["sigma"]), np.asarray(details["noise"])
  assert np.all((sigma >= 0) & (sigma <= run["config"].can.noise_std))
  np.testing.assert_allclose(details["inputs"], views + noise, rtol=1e-6, atol=1e-6)
  # per image the noise is sigma * N(0, 1): its std over 16x16x3 values is sigma
  np.testing.assert_allclose(noise.reshape(12, -1).std(1), sigma, rtol=0.15)
  target = np.asarray(patchify(jnp.asarray(views + noise), 4))  # norm_pix_loss is off
  mask = np.asarray(details["masking"].mask)
  per_patch = ((np.asarray(details["pred"]) - target) ** 2).mean(-1)
  np.testing.assert_allclose(run["losses"]["mae"], (per_patch * mask).sum() / mask.sum(), rtol=1e-5)


def test_noise_loss_counts_visible_patches_only(run):
  details = run["details"]
  visible = 1.0 - np.asarray(details["masking"].mask)
  noise = np.asarray(patchify(details["noise"], 4))
  per_patch = ((np.asarray(details["noise_pred"]) - noise) ** 2).mean(-1)
  np.testing.assert_allclose(run["losses"]["noise"], (per_patch * visible).sum() / visible.sum(),
                             rtol=1e-5)
  # the original reads noise from the one decoder output at the visible patches
  np.testing.assert_array_equal(details["noise_pred"], details["pred"])


def test_zero_noise_std_gives_a_zero_noise_target():
  config = small_config(**{"can.noise_std": 0.0})
  batch = random_batch(config)
  result = run_terms(config, batch)
  losses, details = result["losses"], result["details"]
  assert np.all(np.asarray(details["noise"]) == 0) and np.all(np.asarray(details["sigma"]) == 0)
  views = np.concatenate([batch["images"][:, 0], batch["images"][:, 1]])
  np.testing.assert_array_equal(details["inputs"], views)
  visible = 1.0 - np.asarray(details["masking"].mask)
  per_patch = (np.asarray(details["noise_pred"]) ** 2).mean(-1)  # target 0: predict no noise
  np.testing.assert_allclose(losses["noise"], (per_patch * visible).sum() / visible.sum(),
                             rtol=1e-5)
  # sigma 0 embeds as sin(0) = 0, cos(0) = 1
  np.testing.assert_array_equal(sinusoidal_embedding(jnp.zeros(3)),
                                np.repeat([[0.0] * 64 + [1.0] * 64], 3, 0))


def test_sigma_embedding_values_and_shape():
  sigma = np.array([0.0, 0.013, 0.05, 0.1], np.float32)
  half = 64
  freqs = np.exp(np.arange(half) * -(np.log(10000) / (half - 1)))
  angles = sigma[:, None] * freqs[None]
  expected = np.concatenate([np.sin(angles), np.cos(angles)], 1)
  np.testing.assert_allclose(sinusoidal_embedding(jnp.asarray(sigma), 128), expected, atol=1e-6)
  config = small_config()
  model = trainer.build_model(config)
  variables = jax.jit(model.init)(RNGS(), random_batch(config))
  out = model.apply(variables, jnp.asarray(sigma),
                    method=lambda module, s: module.noise_level_embedding(s))
  assert out.shape == (4, 32)  # encoder width: added to every encoder output token
  params = variables["params"]["noise_level_embedding"]
  assert params["fc1"]["kernel"].shape == (128, 32) and params["fc2"]["kernel"].shape == (32, 32)
  fc1, fc2 = jax.tree.map(np.asarray, (params["fc1"], params["fc2"]))
  manual = np.maximum(expected @ fc1["kernel"] + fc1["bias"], 0) @ fc2["kernel"] + fc2["bias"]
  np.testing.assert_allclose(out, manual, rtol=1e-4, atol=1e-5)


def test_sigma_embedding_reaches_the_decoder(run):
  """Zeroing the embedding's layers changes the decoder output (same masks, same noise)."""
  params = dict(run["variables"]["params"])
  params["noise_level_embedding"] = jax.tree.map(jnp.zeros_like, params["noise_level_embedding"])
  _, _, changed = apply_terms(run["model"], {"params": params}, run["batch"]["images"])
  np.testing.assert_array_equal(changed["noise"], run["details"]["noise"])
  assert not np.allclose(changed["pred"], run["details"]["pred"], atol=1e-4)


def test_total_loss_is_the_official_weighting(run):
  loss, m = run["loss"], run["metrics"]
  expected = 0.97 * (0.3 * m["loss/noise"] + 0.7 * m["loss/mae"]) + 0.03 * m["loss/contrastive"]
  np.testing.assert_allclose(loss, expected, rtol=1e-6)


def shapes_of_terms(config, batch):
  """(params, (losses, metrics, details)) as shapes only: traced, never compiled or run."""
  model = trainer.build_model(config)
  variables = jax.eval_shape(model.init, RNGS(), batch)
  terms = jax.eval_shape(lambda v, images: model.apply(
      v, images, True, rngs=RNGS(10), method=lambda module, *a: module._terms(*a)),
      variables, batch["images"])
  return variables["params"], terms


def test_noise_switched_off_builds_and_computes_no_noise_branch():
  config = small_config(**{"can.w_noise": 0.0})
  batch = random_batch(config)
  params, (losses, _, details) = shapes_of_terms(config, batch)
  assert set(params) == {"encoder", "decoder", "projector"}
  assert set(losses) == {"mae", "contrastive"} and "noise" not in details and "sigma" not in details
  model = trainer.build_model(config)
  variables = jax.jit(model.init)(RNGS(), batch)
  loss_and_grads = jax.jit(jax.value_and_grad(
      lambda p: model.apply({"params": p}, batch, rngs=RNGS(10)), has_aux=True))
  (loss, m), grads = loss_and_grads(variables["params"])
  np.testing.assert_allclose(loss, 0.97 * m["loss/mae"] + 0.03 * m["loss/contrastive"], rtol=1e-6)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_separate_noise_head_keeps_the_mae_decoder_intact():
  config = small_config(**{"can.noise_head": "separate"})
  batch = random_batch(config)
  result = run_terms(config, batch)
  params, losses, details = result["variables"]["params"], result["losses"], result["details"]
  assert params["noise_pred"]["kernel"].shape == (32, 48)  # decoder width -> p*p*C
  assert params["decoder"]["decoder_pred"]["kernel"].shape == (32, 48)
  assert not np.allclose(details["noise_pred"], details["pred"])
  assert np.isfinite(losses["noise"])


def test_zero_weight_terms_are_not_built():
  config = small_config(**{"can.w_simclr": 0.0})
  params, (losses, _, _) = shapes_of_terms(config, random_batch(config))
  assert "projector" not in params and set(losses) == {"mae", "noise"}
  config = small_config(**{"can.w_mae": 0.0})
  params, (losses, _, details) = shapes_of_terms(config, random_batch(config))
  assert set(params) == {"encoder", "projector"} and set(losses) == {"contrastive"}
  assert "noise" not in details  # no denoising when the reconstruction terms are off


@pytest.mark.slow
def test_can_trains_on_digits(tmp_path):
  config = small_config(stop_at_step=4, log_every_steps=2)
  summary = trainer.train_and_evaluate(config, str(tmp_path))
  assert summary["step"] == 4
  for key in ("loss", "loss/mae", "loss/noise", "loss/contrastive"):
    assert np.isfinite(summary[key]), key
