"""MaPeT: two-stream masks, no information leak, tokenizer, configs, training on digits."""
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sjmae_jax import checkpointing, interop, optim, trainer
from sjmae_jax.interop import timm as timm_interop
from sjmae_jax.models.vit import VisionTransformer, patchify, vit_kwargs
from sjmae_jax.objectives import mapet
from sjmae_jax.tokenizers import kmeans, tokenizer
from tests.helpers import REPO, load_config, override, train_losses

RNGS = lambda seed=0: {"params": jax.random.PRNGKey(seed),
                       "permutation": jax.random.PRNGKey(seed + 1),
                       "dropout": jax.random.PRNGKey(seed + 2)}
TINY = {"model.embed_dim": 32, "model.depth": 2, "model.num_heads": 2, "batch_size": 32,
        "log_every_steps": 2, "picture_every_steps": 0, "checkpoint.every_steps": 1000,
        "epochs": 2, "warmup_epochs": 1}


def tiny_config(arg=None, **overrides):
  return override(load_config("mapet", arg), {**TINY, **overrides})


def random_batch(config, n=4, seed=0):
  batch = trainer.sample_batch(config, n)
  batch["images"] = jax.random.normal(jax.random.PRNGKey(seed), batch["images"].shape)
  return batch


# ---- attention masks against a token-by-token reference ----

def reference_masks(order, num_context):
  """mask_h, mask_q of one sample, from what each row has seen, one token at a time."""
  order = [int(t) for t in order]
  num_tokens = len(order)
  context, predicted = set(order[:num_context]), order[num_context:]
  num_keys = num_tokens + len(predicted)  # content tokens 0..T-1, then one per predicted position
  mask_h = np.zeros((num_keys, num_keys), bool)
  mask_q = np.zeros((len(predicted), num_keys), bool)

  def fill(row, revealed):
    for token in range(num_tokens):
      row[token] = token in revealed
    for m, position in enumerate(predicted):
      row[num_tokens + m] = position not in revealed

  for token in range(num_tokens):
    if token in context:
      revealed = set(context)
    else:
      revealed = context | set(predicted[:predicted.index(token) + 1])
    fill(mask_h[token], revealed)
  for m in range(len(predicted)):
    fill(mask_h[num_tokens + m], set(context))  # positional tokens of h: context and positions
    fill(mask_q[m], context | set(predicted[:m]))
  mask_h[num_tokens:, num_tokens:] = True
  return mask_h, mask_q


@pytest.mark.parametrize("num_patches,num_context", [(9, 3), (9, 1), (9, 9), (16, 4)])
def test_masks_match_token_by_token_reference(num_patches, num_context):
  orders = np.asarray(mapet.random_permutations(jax.random.PRNGKey(num_context), 5, num_patches))
  assert np.all(orders[:, 0] == 0)
  assert all(sorted(o) == list(range(num_patches + 1)) for o in orders)
  assert len({tuple(o) for o in orders}) == 5  # per-sample permutations
  mask_h, mask_q = jax.jit(mapet.two_stream_masks, static_argnums=1)(orders, num_context)
  for b, order in enumerate(orders):
    expected_h, expected_q = reference_masks(order, num_context)
    np.testing.assert_array_equal(mask_h[b], expected_h)
    np.testing.assert_array_equal(mask_q[b], expected_q)
  joint = mapet.joint_mask(mask_h, mask_q)
  t, m = num_patches + 1, num_patches + 1 - num_context
  assert joint.shape == (5, 1, t + 2 * m, t + 2 * m)
  assert not joint[:, :, :, t + m:].any()  # the query stream is never a key


def test_default_context_is_the_paper_s_50_of_197():
  assert mapet.default_num_context(196) == 50
  assert mapet.default_num_context(16) == 4
  assert mapet.default_num_context(64) == 16


# ---- the two streams ----

def bound_model(config, seed=0):
  model = trainer.build_model(config)
  variables = jax.jit(model.init)(RNGS(seed), random_batch(config))
  return model, variables


def test_no_information_leak():
  """A predicted position's output depends on exactly the patches revealed before it."""
  config = tiny_config(**{"model.depth": 3, "mapet.num_context": 5})
  model, variables = bound_model(config)
  c, num_patches, p = 5, 16, 4
  order = mapet.random_permutations(jax.random.PRNGKey(7), 1, num_patches)
  rank = np.argsort(np.asarray(order[0]))
  images = jax.random.normal(jax.random.PRNGKey(3), (1, 16, 16, 3))
  probe = jax.random.normal(jax.random.PRNGKey(4), (config.model.embed_dim,))

  def outputs(images):  # one scalar per output token: content rows then query rows
    content, query = model.apply(variables, images, order, False, method="two_streams")
    return jnp.concatenate([content[0], query[0]]) @ probe

  jacobian = jax.jit(jax.jacrev(outputs))(images)[:, 0]  # (T + M, H, W, C)
  depends = np.asarray(jnp.abs(patchify(jacobian, p)).sum(-1) > 0)  # (T + M, L)
  patch_rank = rank[1:]
  for m in range(num_patches + 1 - c):
    step = c + m
    np.testing.assert_array_equal(depends[17 + m], patch_rank < step, err_msg=f"query {m}")
  for token in range(1, 17):  # content stream: a predicted token sees itself and earlier ones
    seen = patch_rank < c if rank[token] < c else patch_rank <= rank[token]
    np.testing.assert_array_equal(depends[token], seen, err_msg=f"content token {token}")


def test_one_joint_sequence_equals_the_explicit_two_streams():
  """[h | g] through each block once == block(h, mask_h) and block(g, context=h, mask_q)."""
  config = tiny_config()
  model, variables = bound_model(config)
  images = random_batch(config)["images"][:, 0]
  order = mapet.random_permutations(jax.random.PRNGKey(1), 4, 16)
  content, query = jax.jit(functools.partial(model.apply, method="two_streams"),
                           static_argnums=3)(variables, images, order, False)

  def explicit_two_streams(variables, images, order):
    bound = model.bind(variables)
    enc, c = bound.encoder, bound.num_context
    pos = enc.pos_embed
    h = jnp.concatenate([jnp.broadcast_to(enc.cls_token + pos[:, :1], (4, 1, 32)),
                         enc.embed_patches(images) + pos[:, 1:]], axis=1)
    g = bound.mask_pos_token + pos[0][order[:, c:]]
    h = jnp.concatenate([h, g], axis=1)
    mask_h, mask_q = mapet.two_stream_masks(order, c)
    for block in enc.blocks:
      h, g = block(h, mask=mask_h[:, None]), block(g, context=h, mask=mask_q[:, None])
    return enc.norm(h), enc.norm(g)

  h, g = jax.jit(explicit_two_streams)(variables, images, order)
  np.testing.assert_allclose(content, h[:, :17], atol=2e-5)
  np.testing.assert_allclose(query, g, atol=2e-5)


def test_remat_gives_the_same_loss_and_gradients():
  batch = random_batch(tiny_config())
  results = []
  for remat in (False, True):
    model, variables = bound_model(tiny_config(**{"model.remat": remat}))
    loss_fn = lambda p: model.apply({"params": p}, batch, rngs=RNGS(5))[0]  # with drop path
    results.append(jax.jit(jax.value_and_grad(loss_fn))(variables["params"]))
  (loss, grads), (remat_loss, remat_grads) = results
  np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(remat_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_encoder_is_the_plain_vit():
  """Params under 'encoder' are a standard ViT's (LayerScale 0.1); MaPeT adds only its token and
  head; `encode` is the plain encoder; the encoder exports to timm."""
  config = tiny_config()
  model, variables = bound_model(config)
  params = variables["params"]
  assert set(params) == {"encoder", "mask_pos_token", "head"}
  vit = VisionTransformer(**vit_kwargs(config.model))
  images = random_batch(config)["images"][:, 0]
  plain = vit.init(jax.random.PRNGKey(0), images)["params"]
  assert jax.tree.map(jnp.shape, plain) == jax.tree.map(jnp.shape, params["encoder"])
  np.testing.assert_allclose(params["encoder"]["blocks_1"]["ls2"]["gamma"], 0.1)
  np.testing.assert_allclose(model.apply(variables, images, method="encode"),
                             vit.apply({"params": params["encoder"]}, images), atol=1e-6)
  state_dict = timm_interop.encoder_to_timm(jax.device_get(params["encoder"]))
  assert "blocks.0.ls1.gamma" in state_dict


def test_pixel_loss_is_norm_pix_mse_of_the_predicted_patches():
  config = tiny_config(**{"mapet.norm_pix_loss": False})
  # each patch is a constant equal to its index: a target names the patch it came from
  index_image = np.repeat(np.repeat(np.arange(16.0).reshape(4, 4), 4, 0), 4, 1)
  images = jnp.asarray(np.tile(index_image[None, None, ..., None], (4, 1, 1, 1, 3)))
  batch = {"images": images, "label": jnp.zeros(4, jnp.int32)}
  model, variables = bound_model(config)
  loss, metrics = model.apply(variables, batch, train=False, rngs=RNGS(5))
  outputs, predicted = model.bind(variables, rngs=RNGS(5))._predict(images[:, 0], False)
  assert outputs.shape == (4, 13, 48) and predicted.shape == (4, 13)
  expected = np.mean((np.asarray(outputs) - np.asarray(predicted)[..., None]) ** 2)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  assert set(metrics) == {"loss/mapet"}


# ---- k-means tokenizer ----

def test_nearest_centroid_matches_brute_force():
  rng = np.random.default_rng(0)
  points, centroids = rng.normal(size=(2, 37, 5)), rng.normal(size=(11, 5))
  ids, distances = kmeans.nearest_centroid(jnp.asarray(points), jnp.asarray(centroids),
                                           chunk_size=16)  # 74 points: a padded last chunk
  assert ids.shape == distances.shape == (2, 37)
  for b in range(2):
    for i in range(37):
      d = [np.sum((points[b, i] - c) ** 2) for c in centroids]
      assert ids[b, i] == int(np.argmin(d))
      np.testing.assert_allclose(distances[b, i], min(d), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("init", ["random", "kmeans++"])
def test_kmeans_finds_separated_clusters(init):
  rng = np.random.default_rng(1)
  centers = rng.normal(size=(6, 8)) * 10
  points = (centers[:, None] + rng.normal(size=(6, 50, 8)) * 0.1).reshape(-1, 8)
  found, history = kmeans.kmeans(jax.random.PRNGKey(2), jnp.asarray(points), k=6, iterations=10,
                                 init=init)
  history = np.asarray(history)
  assert history.shape == (11,) and np.all(np.diff(history) <= 1e-4 * history[0])
  distance = np.linalg.norm(np.asarray(found)[:, None] - centers[None], axis=-1)
  assert sorted(distance.argmin(1)) == list(range(6))  # one centroid per cluster
  assert distance.min(1).max() < 0.1


def test_lloyd_step_moves_an_empty_centroid_to_the_farthest_point():
  points = jnp.array([[0.0], [0.1], [1.0], [5.0]])
  centroids = jnp.array([[0.0], [1.0], [100.0]])  # the last one owns no point
  updated, _ = kmeans.lloyd_step(points, centroids)
  np.testing.assert_allclose(np.asarray(updated)[:, 0], [0.05, 3.0, 5.0])


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
  """A tiny random teacher saved as timm weights, as an imported checkpoint would be."""
  path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
  teacher = VisionTransformer(img_size=16, patch_size=4, embed_dim=24, depth=1, num_heads=2)
  params = teacher.init(jax.random.PRNGKey(5), jnp.zeros((1, 16, 16, 3)))["params"]
  interop.save_state_dict(timm_interop.encoder_to_timm(jax.device_get(params)), path)
  return path, teacher, params


@pytest.fixture(scope="module")
def tokenizer_path(teacher_file, tmp_path_factory):
  """The fit_kmeans CLI on digits with the tiny teacher, k = 16."""
  out = tmp_path_factory.mktemp("tokenizer") / "digits16.npy"
  result = subprocess.run(
      [sys.executable, "-m", "sjmae_jax.tokenizers.fit_kmeans", f"--teacher={teacher_file[0]}",
       f"--config={REPO / 'configs' / 'mapet.py'}", f"--out={out}", "--codebook_size=16",
       "--num_images=64", "--iterations=4", "--teacher_num_heads=2", "--batch_size=32"],
      cwd=REPO, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2"))
  assert result.returncode == 0, result.stderr[-3000:]
  return out


def test_fit_kmeans_writes_a_self_contained_tokenizer(tokenizer_path, teacher_file):
  info = json.loads(tokenizer_path.with_suffix(".json").read_text())
  assert info["codebook_size"] == 16 and info["feature_dim"] == 24
  assert info["num_images"] == 64 and info["num_points"] == 64 * 16
  history = info["mean_sq_distance"]
  assert len(history) == 5 and history[-1] < history[0]
  assert info["teacher"]["img_size"] == 16 and info["teacher"]["num_heads"] == 2
  np.testing.assert_allclose(info["teacher_mean"], tokenizer.NORMALIZATIONS["imagenet"][0])
  loaded = tokenizer.read_tokenizer(tokenizer_path).load_arrays()
  assert loaded["codebook"].shape == (16, 24)
  _, _, params = teacher_file
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(loaded["encoder"]),
                          jax.tree.leaves(params)):
    np.testing.assert_allclose(a, b, err_msg=jax.tree_util.keystr(path))


def token_config(tokenizer_path, **overrides):
  return tiny_config(**{"mapet.target": "tokens", "mapet.tokenizer": str(tokenizer_path),
                        **overrides})


def test_token_targets_are_the_nearest_codes_of_the_frozen_teacher(tokenizer_path, teacher_file):
  config = token_config(tokenizer_path)
  batch = random_batch(config)
  model, variables = bound_model(config)
  assert set(variables["params"]) == {"encoder", "mask_pos_token", "head", "teacher"}
  images = batch["images"][:, 0]
  bound = model.bind(variables, rngs=RNGS(5))
  logits, predicted = bound._predict(images, False)
  ids = bound.targets(images)
  assert logits.shape == (4, 13, 16) and ids.shape == (4, 16) and ids.dtype == jnp.int32
  _, teacher, teacher_params = teacher_file
  features = np.asarray(teacher.apply({"params": teacher_params}, images)[:, 1:])
  codebook = np.load(tokenizer_path)
  expected = np.argmin(((features[:, :, None] - codebook[None, None]) ** 2).sum(-1), axis=-1)
  np.testing.assert_array_equal(ids, expected)

  loss, metrics = model.apply(variables, batch, train=False, rngs=RNGS(5))
  target = np.take_along_axis(expected, np.asarray(predicted), axis=1)
  log_probs = np.asarray(jax.nn.log_softmax(logits))
  np.testing.assert_allclose(
      loss, -np.mean(np.take_along_axis(log_probs, target[..., None], -1)), rtol=1e-5)
  np.testing.assert_allclose(metrics["mapet/top1"], np.mean(logits.argmax(-1) == target))

  grads = jax.jit(jax.grad(lambda p: model.apply({"params": p}, batch, rngs=RNGS(5))[0]))(
      variables["params"])
  assert all(np.all(g == 0) for g in jax.tree.leaves(grads["teacher"]))
  multipliers = optim.lr_multipliers(variables["params"], config.optim)
  assert set(jax.tree.leaves(multipliers["teacher"])) == {0.0}  # frozen: no update, no state
  with pytest.raises(ValueError, match="lr_mults"):
    trainer.build_model(token_config(tokenizer_path,
                                     **{"optim.lr_mults": ((".*pos_embed", 0.0),)}))


def test_building_a_token_model_reads_only_the_json(tokenizer_path, tmp_path):
  """Shapes (eval_shape, e.g. when another run loads this one's checkpoint) need no arrays."""
  for suffix in (".json", ".npy"):
    (tmp_path / f"tok{suffix}").write_bytes(tokenizer_path.with_suffix(suffix).read_bytes())
  config = token_config(tmp_path / "tok.npy")  # no .teacher.safetensors beside it
  state = trainer.abstract_train_state(config)
  assert state["params"]["teacher"]["codebook"].shape == (16, 24)
  with pytest.raises(Exception, match="teacher.safetensors"):
    bound_model(config)


def test_teacher_from_a_workdir_at_another_grid(tmp_path):
  """A run's own checkpoint as teacher; its 8x8 position grid is resampled to the student's 4x4."""
  teacher_config = tiny_config("img=32")
  model = trainer.build_model(teacher_config)
  tx, _ = optim.make_optimizer(teacher_config, 10)
  state = trainer.init_state(model, tx, teacher_config, jax.random.PRNGKey(0))
  checkpointing.write_config(tmp_path, teacher_config)
  checkpointer = checkpointing.Checkpointer(tmp_path, async_save=False)
  checkpointer.save(1, state, force=True)
  checkpointer.close()

  kwargs, params = tokenizer.load_teacher(tmp_path, grid=4)
  assert kwargs["img_size"] == 16 and kwargs["patch_size"] == 4 and kwargs["num_heads"] == 2
  assert kwargs["layer_scale_init"] is not None and kwargs["final_norm"]
  assert params["pos_embed"].shape == (1, 17, 32)
  images = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
  norm = tokenizer.NORMALIZATIONS["imagenet"]
  features = tokenizer.teacher_features(kwargs, params, images, data_norm=norm, teacher_norm=norm)
  assert features.shape == (2, 16, 32)  # resized to 16 x 16 inside


def test_clip_tower_teacher_matches_timm(tmp_path):
  """A timm CLIP image tower (pre-norm, no patch bias, eps 1e-5, QuickGELU) as teacher."""
  import torch
  from timm.models.vision_transformer import VisionTransformer as TimmViT
  torch.manual_seed(0)
  clip = TimmViT(img_size=16, patch_size=4, embed_dim=24, depth=2, num_heads=2, pre_norm=True,
                 norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-5),
                 act_layer="quick_gelu", num_classes=8).eval()  # head = CLIP's projection
  with torch.no_grad():
    for name, value in clip.named_parameters():
      if "norm" in name:  # non-trivial LayerNorms, so that a skipped norm shows
        value.add_(0.3 * torch.randn_like(value))
      if "fc1" in name:  # pre-activations of order 1, where QuickGELU and GELU differ
        value.mul_(30.0)
  interop.save_state_dict({k: v.numpy() for k, v in clip.state_dict().items()},
                          tmp_path / "clip.safetensors")
  kwargs, params = tokenizer.load_teacher(tmp_path / "clip.safetensors", grid=4, num_heads=2)
  assert kwargs["pre_norm"] and not kwargs["patch_bias"] and kwargs["norm_eps"] == 1e-5
  assert kwargs["act_layer"] == "quick_gelu" and "head" not in params

  rng = np.random.default_rng(0)
  pixels = rng.uniform(size=(2, 16, 16, 3)).astype(np.float32)  # [0, 1] images
  clip_mean, clip_std = tokenizer.NORMALIZATIONS["clip"]
  with torch.no_grad():
    expected = clip.forward_features(
        torch.from_numpy(((pixels - clip_mean) / clip_std).astype(np.float32).transpose(0, 3, 1, 2))
    )[:, 1:].numpy()
  imagenet = tokenizer.NORMALIZATIONS["imagenet"]  # the data pipeline's, re-normalised inside
  features = tokenizer.teacher_features(kwargs, params, (pixels - imagenet[0]) / imagenet[1],
                                        data_norm=imagenet, teacher_norm=(clip_mean, clip_std))
  np.testing.assert_allclose(features, expected, atol=1e-4)
  # the teacher entry of a tokenizer written when CLIP towers were a class of their own
  legacy = {key: value for key, value in kwargs.items() if key not in (*tokenizer.CLIP_TOWER,
                                                                          "act_layer")}
  legacy.update(architecture="clip", quick_gelu=True)
  np.testing.assert_array_equal(
      tokenizer.teacher_features(legacy, params, (pixels - imagenet[0]) / imagenet[1],
                                 data_norm=imagenet, teacher_norm=(clip_mean, clip_std)), features)
  exact_gelu = dict(kwargs, act_layer="gelu")
  features = tokenizer.teacher_features(exact_gelu, params, (pixels - imagenet[0]) / imagenet[1],
                                        data_norm=imagenet, teacher_norm=(clip_mean, clip_std))
  assert not np.allclose(features, expected, atol=1e-2)


# ---- configs and training ----

@pytest.mark.parametrize("arg,img,patch,context,lr", [
    (None, 16, 4, 4, 128 * 1.5e-3 / 256),
    ("data=cifar10,model=vit_tiny", 32, 4, 16, 1.5e-3),
    ("data=imagenet2012,model=vit_base", 224, 16, 50, 1.5e-3),
])
def test_config_variants(arg, img, patch, context, lr):
  config = load_config("mapet", arg)
  assert config.method == "mapet" and config.mapet.target == "pixels"
  assert (config.model.img_size, config.model.patch_size) == (img, patch)
  assert config.model.layer_scale_init == 0.1 and config.model.drop_path_rate == 0.1
  assert config.optim.clip_grad_norm == 3.0 and config.optim.weight_decay == 0.05
  np.testing.assert_allclose(optim.base_learning_rate(config), lr)
  assert mapet.default_num_context((img // patch) ** 2) == context
  if img == 224:
    assert (config.epochs, config.warmup_epochs, config.batch_size) == (300, 10.0, 2048)
    assert config.mapet.codebook_size == 8192
  state = trainer.abstract_train_state(config)  # builds at full size, shapes only
  assert set(state["params"]) == {"encoder", "mask_pos_token", "head"}


def test_loss_decreases_on_digits():
  config = tiny_config()
  losses = train_losses(config, 60)
  assert np.all(np.isfinite(losses))
  assert np.mean(losses[-10:]) < 0.95 * np.mean(losses[:10]), losses


@pytest.mark.slow
def test_train_py_with_token_targets(tokenizer_path, tmp_path):
  overrides = {**TINY, "mapet.target": "tokens", "mapet.tokenizer": tokenizer_path,
               "stop_at_step": 4, "picture_every_steps": 4}
  result = subprocess.run(
      [sys.executable, str(REPO / "train.py"), f"--config={REPO / 'configs' / 'mapet.py'}",
       f"--workdir={tmp_path}"] + [f"--config.{k}={v}" for k, v in overrides.items()],
      cwd=REPO, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
               XLA_FLAGS="--xla_force_host_platform_device_count=2"))
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["step"] == 4 and np.isfinite(summary["loss/mapet"])
  assert 0 <= summary["mapet/top1"] <= 1
  params, _ = checkpointing.load_params(tmp_path)
  loaded = tokenizer.read_tokenizer(tokenizer_path).load_arrays()
  np.testing.assert_array_equal(params["teacher"]["codebook"], loaded["codebook"])  # frozen
