"""The optimizer policy (sjmae_jax/optim.py) of the evaluation protocols: LARS against a
hand-computed NumPy step, MAE's layer-wise lr decay and weight-decay groups for every parameter of
a ViT-T classifier, and the linear probe's frozen encoder."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sjmae_jax import optim
from sjmae_jax.interop.convert import flatten, torch_key
from sjmae_jax.models.classifier import ViTClassifier
from sjmae_jax.models.vit import vit_kwargs
from tests.helpers import load_config


def numpy_lars_step(p, g, mu, lr, wd, momentum=0.9, trust=0.001):
  """facebookresearch/mae util/lars.py, one parameter, written out by hand."""
  d = g.copy()
  if p.ndim > 1:
    d = d + wd * p
    p_norm, d_norm = np.linalg.norm(p), np.linalg.norm(d)
    q = trust * p_norm / d_norm if p_norm > 0 and d_norm > 0 else 1.0
    d = d * q
  mu = momentum * mu + d
  return p - lr * mu, mu


def test_lars_matches_mae_by_hand():
  rng = np.random.default_rng(0)
  params = {"kernel": rng.normal(size=(5, 3)).astype(np.float32),
            "bias": rng.normal(size=(3,)).astype(np.float32),
            "zero": np.zeros((2, 2), np.float32)}  # ||p|| = 0: no adaptation
  lrs = [0.5, 2.0, 1.0]  # a changing lr scales the buffer at each step (not before momentum)
  schedule = lambda step: jnp.asarray(lrs)[step]
  decay_all_matrices = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  tx = optim.lars(schedule, momentum=0.9, trust_coefficient=0.001, weight_decay=0.1,
                  decay_mask=decay_all_matrices)
  state = tx.init(params)
  expected = {k: v.copy() for k, v in params.items()}
  buffers = {k: np.zeros_like(v) for k, v in params.items()}
  current = {k: jnp.asarray(v) for k, v in params.items()}
  for step in range(3):
    grads = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
    updates, state = tx.update(grads, state, current)
    current = optax.apply_updates(current, updates)
    for k in params:
      expected[k], buffers[k] = numpy_lars_step(expected[k].astype(np.float64), grads[k],
                                                buffers[k], lrs[step], 0.1)
    for k in params:
      np.testing.assert_allclose(np.asarray(current[k]), expected[k], rtol=1e-5, atol=1e-7,
                                 err_msg=f"{k} step {step}")
  # The kernel moved by lr x trust-ratio-sized steps, the bias by plain momentum SGD.
  assert np.abs(np.asarray(current["bias"]) - params["bias"]).max() > 0.1
  assert np.abs(np.asarray(current["kernel"]) - params["kernel"]).max() < 0.05


def mae_layer_id(name, num_layers):
  """facebookresearch/mae util/lr_decay.py get_layer_id_for_vit, on timm names."""
  if name in ["cls_token", "pos_embed"]:
    return 0
  elif name.startswith("patch_embed"):
    return 0
  elif name.startswith("blocks"):
    return int(name.split(".")[1]) + 1
  else:
    return num_layers


def vit_tiny_classifier_params(global_pool):
  config = load_config("finetune", "data=cifar10")
  classifier = ViTClassifier(vit_kwargs(config.model), 10, global_pool=global_pool)
  size = config.model.img_size
  return jax.eval_shape(classifier.init, jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))[
      "params"], config.model


@pytest.mark.parametrize("global_pool", ["avg", "token"])
def test_layer_decay_and_weight_decay_follow_mae_for_every_vit_tiny_param(global_pool):
  params, model = vit_tiny_classifier_params(global_pool)
  depth, decay = 12, 0.75
  policy = load_config("finetune", "data=imagenet2012").optim  # layer decay 0.75 and MAE's decay list
  assert policy.layer_decay == decay and optim.encoder_depth(params) == depth
  scales = flatten(optim.lr_multipliers(params, policy))
  decays = flatten(jax.tree.map(lambda m: m > 0, optim.wd_multipliers(params, policy)))
  shapes = flatten(params)
  assert len(scales) == len(shapes) == 152  # 4 embedding + 12 x 12 block + 4 norm / head
  no_weight_decay_list = {"pos_embed", "cls_token", "dist_token"}
  seen_layers = set()
  for path, shape in shapes.items():
    name = torch_key(path[1:] if path[0] == "encoder" else path)  # timm name, as MAE sees it
    layer = mae_layer_id(name, depth + 1)
    seen_layers.add(layer)
    assert scales[path] == pytest.approx(decay ** (depth + 1 - layer)), name
    mae_no_decay = len(shape.shape) == 1 or name in no_weight_decay_list
    assert decays[path] == (not mae_no_decay), name
  assert seen_layers == set(range(depth + 2))
  assert scales[("head", "kernel")] == 1.0 and scales[("encoder", "pos_embed")] == decay ** 13


def test_finetune_optimizer_scales_each_update_by_its_layer():
  params, _ = vit_tiny_classifier_params("avg")
  params = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), params)
  config = load_config("finetune", "data=imagenet2012")  # layer decay 0.75
  config.unlock()
  config.lr, config.warmup_epochs, config.optim.weight_decay = 1e-3, 0.0, 0.0
  tx, _ = optim.make_optimizer(config, steps_per_epoch=10)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
  updates, _ = tx.update(grads, tx.init(params), params)
  # AdamW's first step is lr x g / |g| (bias-corrected moments): exactly the scaled lr.
  for path, update in flatten(updates).items():
    name = torch_key(path[1:] if path[0] == "encoder" else path)
    expected = 1e-3 * 0.75 ** (13 - mae_layer_id(name, 13))
    np.testing.assert_allclose(np.asarray(update), -expected, rtol=1e-4, err_msg=name)


def test_an_lr_multiplier_of_0_freezes_without_optimizer_state():
  """The linear probe's policy: the encoder (and fc_norm) get no update and no LARS momentum; the
  head gets its LARS step."""
  config = load_config("linprobe")
  params = {"encoder": {"blocks_0": {"mlp": {"fc1": {"kernel": jnp.ones((4, 4))}}},
                        "pos_embed": jnp.ones((1, 5, 4))},
            "fc_norm": {"scale": jnp.ones((4,))},
            "probe_head": {"head": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros((3,))}}}
  tx, _ = optim.make_optimizer(config, steps_per_epoch=10)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  for _ in range(3):  # past step 0, where the warmup lr is 0
    updates, state = tx.update(grads, state, params)
  assert all(not np.asarray(u).any() for u in jax.tree.leaves(
      {k: updates[k] for k in ("encoder", "fc_norm")}))
  assert np.asarray(updates["probe_head"]["head"]["kernel"]).min() < 0
  buffers = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state) if np.ndim(x))
  assert buffers == 4 * 3 + 3  # momentum of the head's kernel and bias only
