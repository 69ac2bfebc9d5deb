import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from sjmae_jax import config_lib, optim


def test_warmup_cosine_schedule_matches_mae_formula():
  sched = optim.warmup_cosine(1.0, warmup_steps=10, total_steps=110, min_lr=0.1)
  assert float(sched(0)) == 0.0
  np.testing.assert_allclose(sched(5), 0.5)
  np.testing.assert_allclose(sched(10), 1.0)
  np.testing.assert_allclose(sched(60), 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)), rtol=1e-6)
  np.testing.assert_allclose(sched(110), 0.1, rtol=1e-6)


def make_config(**kw):
  return ml_collections.ConfigDict(dict(
      epochs=2, warmup_epochs=1.0, blr=1e-3, lr=0.0, min_lr=0.0, batch_size=512,
      optim=config_lib.optim_config(weight_decay=0.5), **kw))


def test_lr_scales_with_batch():
  assert optim.base_learning_rate(make_config()) == 1e-3 * 512 / 256


def test_weight_decay_mask_and_frozen_params():
  params = {"encoder": {"pos_embed": jnp.ones((1, 5, 4)), "cls_token": jnp.ones((1, 1, 4)),
                        "dense": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones((4,))},
                        "norm": {"scale": jnp.ones((4,))}}}
  tx, _ = optim.make_optimizer(make_config(), steps_per_epoch=10)
  state = tx.init(params)
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  # step 1 (lr > 0 after warmup starts): with zero gradients only weight decay moves params
  for _ in range(2):
    updates, state = tx.update(zero_grads, state, params)
  enc = updates["encoder"]
  assert np.all(np.asarray(enc["pos_embed"]) == 0)          # frozen
  assert np.all(np.asarray(enc["dense"]["bias"]) == 0)      # 1-D: no decay
  assert np.all(np.asarray(enc["norm"]["scale"]) == 0)
  assert np.all(np.asarray(enc["dense"]["kernel"]) < 0)     # decayed
  assert np.all(np.asarray(enc["cls_token"]) < 0)           # MAE decays cls (ndim 3)
  big_grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(big_grads, state, params)
  assert np.all(np.asarray(updates["encoder"]["pos_embed"]) == 0)


@pytest.mark.parametrize("clip", [0.0, 1.0])
def test_flat_adamw_is_the_per_leaf_update(clip):
  """optim.flatten=True: the same updates as the per-leaf adamw (weight decay mask, frozen
  pos_embed, gradient clipping), over two flat vectors; its state is two flat vectors."""
  params = {"encoder": {"pos_embed": jnp.ones((1, 5, 4)), "cls_token": jnp.ones((1, 1, 4)),
                        "dense": {"kernel": jnp.full((4, 3), 0.5), "bias": jnp.ones((3,))},
                        "norm": {"scale": jnp.ones((4,))}}}
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(0), 3 * len(leaves))
  updates = {}
  for flatten in (False, True):
    config = make_config()
    config.optim.clip_grad_norm = clip
    config.optim.flatten = flatten
    tx, _ = optim.make_optimizer(config, steps_per_epoch=10)
    state, current = tx.init(params), params
    for step in range(3):
      grads = jax.tree.unflatten(tree, [jax.random.normal(keys[step * len(leaves) + i], leaf.shape)
                                        for i, leaf in enumerate(leaves)])
      update, state = tx.update(grads, state, current)
      current = optax.apply_updates(current, update)
    updates[flatten] = current
    if flatten:
      vectors = [leaf for leaf in jax.tree.leaves(state) if leaf.ndim == 1 and leaf.size > 4]
      assert sorted(v.size for v in vectors) == [3 + 4, 3 + 4, 4 + 12, 4 + 12]  # mu, nu x 2
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               updates[True], updates[False])
  np.testing.assert_array_equal(updates[True]["encoder"]["pos_embed"], 1.0)


def mae_lr_at(epoch, peak, min_lr, warmup_epochs, epochs):
  """facebookresearch/mae util/lr_sched.py adjust_learning_rate, called with the fractional epoch
  data_iter_step / len(data_loader) + epoch at every optimizer step."""
  if epoch < warmup_epochs:
    return peak * epoch / warmup_epochs
  return min_lr + (peak - min_lr) * 0.5 * (
      1.0 + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))


def test_fractional_warmup_is_exact_in_pretraining_probe_and_finetune():
  """warmup 0.5 epochs of 5 steps = 2.5 steps: step 2 is still warming up (0.8 x peak), not at the
  peak as a warmup rounded to 2 steps would be; the cosine starts at epoch 0.5, not 0.4."""
  from tests.helpers import load_config
  steps_per_epoch, epochs, warmup_epochs = 5, 3, 0.5
  pretrain = make_config()
  pretrain.epochs, pretrain.warmup_epochs, pretrain.min_lr = epochs, warmup_epochs, 1e-5
  _, pretrain_schedule = optim.make_optimizer(pretrain, steps_per_epoch)
  schedules = {"pretrain": (pretrain_schedule, pretrain)}
  for name in ("finetune", "linprobe"):
    config = load_config(name)
    config.unlock()
    config.epochs, config.warmup_epochs, config.lr, config.min_lr = epochs, warmup_epochs, 0.1, 1e-4
    _, schedule = optim.make_optimizer(config, steps_per_epoch)  # every program's
    schedules[name] = (schedule, config)
  for name, (schedule, config) in schedules.items():
    peak = optim.base_learning_rate(config)
    expected = [mae_lr_at(step / steps_per_epoch, peak, config.min_lr, warmup_epochs, epochs)
                for step in range(epochs * steps_per_epoch)]
    got = [float(schedule(step)) for step in range(epochs * steps_per_epoch)]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-9, err_msg=name)
    np.testing.assert_allclose(got[2], 0.8 * peak, rtol=1e-6, err_msg=name)
