"""The objective contract, over every registered objective; typed configs, rng streams, registry,
and the shared loss and picture helpers."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sjmae_jax import checkpointing, objectives, optim, trainer
from sjmae_jax.objectives import base
from sjmae_jax.objectives.losses import softmax_cross_entropy
from sjmae_jax.objectives.pictures import MIN_TILE_SIDE, for_display, picture_grid
from tests.helpers import REPO, load_config

TINY = {"model.embed_dim": 32, "model.depth": 1, "model.num_heads": 2,
        "decoder.embed_dim": 32, "decoder.depth": 1, "decoder.num_heads": 2, "batch_size": 8}
PRETRAINING_CONFIGS = sorted(
    path.stem for path in (REPO / "configs").glob("*.py") if "method" in load_config(path.stem))


def tiny(name: str, arg=None, **overrides):
  """configs/<name>.py with a 1-block encoder (and decoder, where the config has one)."""
  config = load_config(name, arg)
  for key, value in {**TINY, **overrides}.items():
    *parents, leaf = key.split(".")
    node = config
    for parent in parents:
      node = node.get(parent)
    if node is not None:
      node[leaf] = value
  return config


def random_batch(config, n=4, seed=0):
  batch = trainer.sample_batch(config, n)
  return dict(batch, images=jax.random.normal(jax.random.PRNGKey(seed), batch["images"].shape),
              label=jnp.arange(n) % 10)


def test_every_pretraining_config_names_a_registered_objective_and_back():
  registered = objectives.registered()
  methods = {name: load_config(name).method for name in PRETRAINING_CONFIGS}
  assert set(methods.values()) <= set(registered), methods
  assert set(registered) <= set(methods.values()), "a registered objective has no configs/*.py"
  assert all(methods[method] == method for method in registered)  # configs/<method>.py


def test_every_module_that_registers_is_discovered():
  """Objectives are found by listing the package: each module whose source calls register has
  an entry (a module outside the listing would be missing from this set)."""
  package = REPO / "sjmae_jax" / "objectives"
  registering = {path.stem for path in package.glob("*.py")
                 if "@objectives.register(" in path.read_text()}
  assert len(registering) >= 6
  assert registering == {cls.__module__.rsplit(".", 1)[1]
                         for cls in objectives.registered().values()}


@pytest.mark.parametrize("method", sorted(objectives.registered()))
@pytest.mark.slow
def test_objective_contract(method, tmp_path):
  config = tiny(method)
  model = objectives.build(config)
  assert isinstance(model, objectives.Objective)
  assert isinstance(model.config, model.config_class)
  assert dataclasses.is_dataclass(model.config)
  tx, _ = optim.make_optimizer(config, steps_per_epoch=1)
  state = jax.jit(lambda rng: trainer.init_state(model, tx, config, rng))(jax.random.PRNGKey(0))
  batch = random_batch(config)

  # one training pass, with exactly the declared rng streams (an undeclared one fails in Flax)
  grad_fn = jax.jit(jax.value_and_grad(trainer.make_loss_fn(model), has_aux=True))
  (loss, (metrics, _)), grads = grad_fn(state["params"], state["batch_stats"], batch,
                                        jax.random.PRNGKey(1))
  assert np.isfinite(loss)
  assert all(np.ndim(v) == 0 and np.isfinite(v) for v in metrics.values()), metrics
  no_gradient = [jax.tree_util.keystr(path) for path, g in
                 jax.tree_util.tree_leaves_with_path(grads["encoder"]) if not np.any(g)]
  assert not no_gradient, f"encoder parameters without a gradient: {no_gradient}"

  kw = model.config.encoder
  images = batch["images"][:, 0]
  variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
  tokens = jax.jit(lambda v, x: model.apply(v, x, method="encode"))(variables, images)
  assert tokens.shape == (4, 1 + (kw["img_size"] // kw["patch_size"]) ** 2, kw["embed_dim"])

  pictures = jax.jit(trainer.pictures_fn(model, config.data))(state, batch)  # as TensorBoard gets them
  assert pictures, "the shipped configs all draw at least one picture"
  for name, picture in pictures.items():
    picture = np.asarray(picture)
    assert picture.ndim == 4 and picture.shape[0] == 1 and picture.shape[-1] == 3, name
    assert np.all(np.isfinite(picture)) and picture.min() >= 0 and picture.max() <= 1, name

  assert hasattr(model, "classify") == model.has_classifier
  if model.has_classifier:
    logits = model.apply(variables, images, method="classify")
    assert logits.shape == (4, model.config.num_classes) and np.all(np.isfinite(logits))

  checkpointer = checkpointing.Checkpointer(tmp_path, async_save=False)
  checkpointer.save(1, state, force=True)
  checkpointer.wait()
  restored = checkpointer.restore(1, jax.eval_shape(lambda: state))
  checkpointer.close()
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for saved, loaded in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    assert saved.dtype == loaded.dtype
    np.testing.assert_array_equal(saved, loaded)
  (resumed_loss, _), _ = grad_fn(restored["params"], restored["batch_stats"], batch,
                                 jax.random.PRNGKey(1))
  assert resumed_loss == loss


# ---- rng streams ----

def test_step_rngs_keep_masking_and_dropout_and_fold_in_other_streams():
  rng = jax.random.PRNGKey(7)
  masking, dropout = jax.random.split(rng)
  mae = objectives.build(tiny("mae"))
  assert mae.rng_streams == ("masking", "dropout")
  rngs = objectives.step_rngs(mae, rng)
  assert set(rngs) == {"masking", "dropout"}
  np.testing.assert_array_equal(rngs["masking"], masking)  # the draws of every earlier version
  np.testing.assert_array_equal(rngs["dropout"], dropout)

  can_rngs = objectives.step_rngs(objectives.build(tiny("can")), rng)
  mapet_rngs = objectives.step_rngs(objectives.build(tiny("mapet")), rng)
  assert set(can_rngs) == {"masking", "noise", "dropout"}
  assert set(mapet_rngs) == {"permutation", "dropout"}
  np.testing.assert_array_equal(can_rngs["noise"],
                                jax.random.fold_in(rng, base.stream_id("noise")))
  np.testing.assert_array_equal(mapet_rngs["dropout"], dropout)
  keys = [tuple(np.asarray(k)) for k in (masking, dropout, can_rngs["noise"],
                                         mapet_rngs["permutation"])]
  assert len(set(keys)) == 4


def test_cans_noise_has_its_own_stream():
  """The masking stream alone decides the mask, the noise stream alone the noise."""
  config = tiny("can")
  model = objectives.build(config)
  batch = random_batch(config)
  rngs = lambda masking, noise: {"masking": jax.random.PRNGKey(masking),
                                 "noise": jax.random.PRNGKey(noise),
                                 "dropout": jax.random.PRNGKey(0)}
  variables = jax.jit(model.init)(dict(rngs(1, 2), params=jax.random.PRNGKey(0)), batch)
  details = jax.jit(lambda m, n: model.apply(variables, batch["images"], False, rngs=rngs(m, n),
                                             method=lambda module, *a: module._terms(*a))[2])
  first, other_noise, other_mask = details(1, 2), details(1, 3), details(4, 2)
  np.testing.assert_array_equal(first["masking"].mask, other_noise["masking"].mask)
  assert not np.array_equal(first["noise"], other_noise["noise"])
  np.testing.assert_array_equal(first["noise"], other_mask["noise"])
  assert not np.array_equal(first["masking"].mask, other_mask["masking"].mask)


# ---- typed configs: every check at start, without data ----

def one_line_error(fn, *args):
  with pytest.raises(ValueError) as error:
    fn(*args)
  message = str(error.value)
  assert "\n" not in message, message
  return message


@pytest.mark.parametrize("name,arg", [("mae", None), ("sjmae", None), ("can", None),
                                      ("simmim", None), ("simmim", "variant=mae_style"),
                                      ("ssat", None), ("ssat", "variant=fgcr"), ("mapet", None)])
def test_check_builds_the_typed_config_of_every_shipped_config(name, arg):
  config = load_config(name, arg)
  settings = objectives.check(config)
  assert isinstance(settings, objectives.objective_class(config.method).config_class)
  block = config[config.method]
  assert all(getattr(settings, key) == value for key, value in block.items())
  # a workdir's config.json (read back to load its weights) gives the same settings
  saved = ml_collections.ConfigDict(json.loads(config.to_json_best_effort()))
  assert objectives.check(saved) == settings


@pytest.mark.parametrize("method,key,value,expected", [
    ("mae", "mae.mask_ratio", 1.0, "config mae.mask_ratio: 1.0 must be in [0, 1)"),
    ("mae", "mae.mask_ratio", 0.99, "config mae.mask_ratio: 0.99 keeps no patch"),
    ("mae", "decoder.num_heads", 3, "config decoder.embed_dim: 32 is not divisible"),
    ("mae", "decoder.mask_token_mode", "slot", "config decoder.mask_token_mode: 'slot' is not"),
    ("sjmae", "sjmae.contrastive_loss", "nce", "config sjmae.contrastive_loss: 'nce' is not"),
    ("sjmae", "sjmae.weighting", "learned", "config sjmae.weighting: 'learned' is not"),
    ("sjmae", "sjmae.temperature", 0.0, "config sjmae.temperature: 0.0 must be > 0"),
    ("can", "can.w_noise", 1.5, "config can.w_noise: 1.5 must be in [0.0, 1.0]"),
    ("can", "can.noise_head", "both", "config can.noise_head: 'both' is not"),
    ("can", "can.noise_std", -0.1, "config can.noise_std: -0.1 must be >= 0.0"),
    ("simmim", "simmim.loss", "l2", "config simmim.loss: 'l2' is not"),
    ("simmim", "simmim.masking", "blocks", "config simmim.masking: 'blocks' is not"),
    ("ssat", "ssat.lam", 2.0, "config ssat.lam: 2.0 must be in [0.0, 1.0]"),
    ("ssat", "ssat.views", 5, "config ssat.views: 5 views of 4 visible patches"),
    ("mapet", "mapet.target", "ids", "config mapet.target: 'ids' is not"),
    ("mapet", "mapet.num_context", 17, "config mapet.num_context: 17 must be in [1, 16]"),
    ("mapet", "mapet.target", "tokens", "config mapet.tokenizer: mapet.target='tokens' needs"),
])
def test_a_bad_value_is_one_line_naming_the_key(method, key, value, expected):
  config = tiny(method, **{key: value})
  assert one_line_error(objectives.check, config).startswith(expected)


def test_typos_and_missing_keys_name_the_key():
  config = tiny("can")
  with config.unlocked():
    config.can.w_nosie = 0.5
  assert one_line_error(objectives.check, config).startswith(
      "config can.w_nosie: unknown key (known: [")
  config = tiny("can")
  with config.unlocked():
    del config.can["w_noise"]
  assert one_line_error(objectives.check, config).startswith("config can.w_noise: missing")
  config = tiny("mae")
  with config.unlocked():
    del config["mae"]
  assert one_line_error(objectives.check, config).startswith("config mae: missing")
  config = tiny("mae")
  with config.unlocked():  # ConfigDict keeps a key's type; a config.json or a new block need not
    config.mae = dict(config.mae.to_dict(), norm_pix_loss="yes")
  assert one_line_error(objectives.check, config).startswith(
      "config mae.norm_pix_loss: 'yes' is not a bool")
  config = tiny("mae", method="maee")
  assert one_line_error(objectives.check, config).startswith(
      "config method: unknown objective 'maee'; known: [")


def test_check_reads_no_data_and_build_reads_what_it_needs(tmp_path):
  """SSAT's num_classes 0 is the dataset's: check passes without the data, build reads it."""
  config = tiny("ssat", **{"ssat.num_classes": 0, "data.source": f"folder:{tmp_path / 'none'}"})
  assert objectives.check(config).num_classes == 0
  with pytest.raises(Exception, match="none"):
    objectives.build(config)
  assert objectives.build(tiny("ssat", **{"ssat.num_classes": 0})).config.num_classes == 10


def test_a_term_switched_off_needs_no_decoder_block():
  config = tiny("ssat", **{"ssat.lam": 1.0})
  with config.unlocked():
    del config["decoder"]
  settings = objectives.check(config)
  assert settings.decoder is None and not settings.use_mae
  assert objectives.check(tiny("simmim")).transformer is None  # linear decoder: not read


# ---- shared helpers ----

def np_log_softmax(x):
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def test_softmax_cross_entropy_matches_numpy():
  rng = np.random.default_rng(3)
  logits, labels = rng.normal(size=(2, 3, 7)), rng.integers(0, 7, size=(2, 3))
  log_probs = np_log_softmax(logits)
  nll = -np.take_along_axis(log_probs, labels[..., None], -1)[..., 0]
  loss, accuracy = softmax_cross_entropy(jnp.asarray(logits), jnp.asarray(labels))
  np.testing.assert_allclose(loss, nll.mean(), rtol=1e-6)
  np.testing.assert_allclose(accuracy, np.mean(logits.argmax(-1) == labels))
  # timm's LabelSmoothingCrossEntropy: (1 - s) NLL + s mean(-log p) == CE against smoothed targets
  smoothed, _ = softmax_cross_entropy(jnp.asarray(logits), jnp.asarray(labels),
                                      label_smoothing=0.1)
  targets = 0.9 * np.eye(7)[labels] + 0.1 / 7
  np.testing.assert_allclose(smoothed, np.mean(-np.sum(targets * log_probs, -1)), rtol=1e-6)
  soft, soft_accuracy = softmax_cross_entropy(jnp.asarray(logits), jnp.asarray(targets, jnp.float32))
  np.testing.assert_allclose(soft, smoothed, rtol=1e-6)
  assert soft_accuracy == accuracy
  # an excluded class (a -inf logit, as NT-Xent's diagonal) is left out of the softmax
  excluded = logits[0].copy()
  excluded[:, 6] = -np.inf
  value, _ = softmax_cross_entropy(jnp.asarray(excluded), jnp.asarray(labels[0] % 6))
  expected = -np.take_along_axis(np_log_softmax(logits[0, :, :6]), labels[0, :, None] % 6, -1)
  np.testing.assert_allclose(value, expected.mean(), rtol=1e-6)


def test_pictures_are_shown_with_the_datas_mean_and_std_gray_stays_gray_and_small_tiles_grow():
  mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
  gray = np.linspace(0.1, 0.9, 2 * 8 * 8).reshape(2, 8, 8, 1).repeat(3, axis=-1)  # R = G = B
  normalized = jnp.asarray((gray - np.asarray(mean)) / np.asarray(std), jnp.float32)
  shown = np.asarray(for_display(picture_grid([normalized, normalized]), mean, std))
  scale = -(-MIN_TILE_SIDE // 8)
  assert shown.shape == (1, 2 * 8 * scale, 2 * 8 * scale, 3)  # 2 rows, 2 columns, enlarged
  np.testing.assert_allclose(shown[..., 0], shown[..., 1], atol=1e-6)  # no tint
  np.testing.assert_allclose(shown[..., 0], shown[..., 2], atol=1e-6)
  np.testing.assert_allclose(shown[0, ::scale, :8 * scale:scale, 0],
                             gray[:, :, :, 0].reshape(16, 8), atol=1e-6)  # the original values
  assert for_display(jnp.full((1, 2, 2, 3), 9.0), mean, std).max() == 1.0  # clipped
