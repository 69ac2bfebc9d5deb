import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sjmae_jax import optim


def test_warmup_cosine_schedule_matches_mae_formula():
  sched = optim.warmup_cosine(1.0, warmup_steps=10, total_steps=110, min_lr=0.1)
  assert float(sched(0)) == 0.0
  np.testing.assert_allclose(sched(5), 0.5)
  np.testing.assert_allclose(sched(10), 1.0)
  np.testing.assert_allclose(sched(60), 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)), rtol=1e-6)
  np.testing.assert_allclose(sched(110), 0.1, rtol=1e-6)


def make_config(**kw):
  return ml_collections.ConfigDict(dict(
      epochs=2, warmup_epochs=1, blr=1e-3, lr=0.0, min_lr=0.0, batch_size=512,
      optim=dict(b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.5, clip_grad_norm=0.0,
                 frozen_params=(".*pos_embed",)), **kw))


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
