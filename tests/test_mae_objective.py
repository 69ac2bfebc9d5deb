import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sjmae_jax.objectives.reconstruction import patch_targets, removed_patch_mse
from sjmae_jax.objectives.masking import num_kept, random_masking


@pytest.mark.parametrize("num_patches,ratio", [(16, 0.75), (196, 0.75), (64, 0.6), (10, 0.0)])
def test_masking_invariants(num_patches, ratio):
  m = random_masking(jax.random.PRNGKey(0), 6, num_patches, ratio)
  k = int(num_patches * (1 - ratio))
  assert m.keep_ids.shape == (6, k) and num_kept(num_patches, ratio) == k
  np.testing.assert_array_equal(m.mask.sum(axis=1), num_patches - k)
  for row in range(6):
    # the kept ids are exactly the patches the mask marks as visible, and each appears once
    assert len(set(np.asarray(m.keep_ids[row]).tolist())) == k
    np.testing.assert_array_equal(np.sort(m.keep_ids[row]), np.flatnonzero(m.mask[row] == 0))
  # ids_restore inverts the shuffle: reconstruct ids_shuffle from ids_restore
  ids_shuffle = np.argsort(np.asarray(m.ids_restore), axis=1)
  np.testing.assert_array_equal(ids_shuffle[:, :k], m.keep_ids)
  np.testing.assert_array_equal(np.take_along_axis(ids_shuffle, np.asarray(m.ids_restore), 1),
                                np.tile(np.arange(num_patches), (6, 1)))


def test_masking_is_independent_per_sample_and_reproducible():
  m = random_masking(jax.random.PRNGKey(1), 32, 64, 0.75)
  sets = {tuple(sorted(np.asarray(r).tolist())) for r in m.keep_ids}
  assert len(sets) == 32
  again = random_masking(jax.random.PRNGKey(1), 32, 64, 0.75)
  np.testing.assert_array_equal(m.keep_ids, again.keep_ids)
  # every patch is removed with frequency ~0.75 over many samples
  big = random_masking(jax.random.PRNGKey(2), 4000, 16, 0.75)
  np.testing.assert_allclose(np.asarray(big.mask).mean(axis=0), 0.75, atol=0.03)


def test_loss_counts_only_removed_patches():
  rng = np.random.default_rng(0)
  pred, target = rng.normal(size=(2, 8, 12)), rng.normal(size=(2, 8, 12))
  mask = np.zeros((2, 8)); mask[0, [1, 4, 6]] = 1; mask[1, [0, 7]] = 1
  expected = sum(((pred[b, i] - target[b, i]) ** 2).mean() for b in range(2) for i in range(8)
                 if mask[b, i]) / 5
  loss = removed_patch_mse(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(mask))
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  visible_changed = pred.copy(); visible_changed[0, 0] += 10
  np.testing.assert_allclose(removed_patch_mse(visible_changed, target, mask), loss, rtol=1e-6)


def test_norm_pix_targets_use_unbiased_variance():
  images = np.random.default_rng(1).normal(size=(1, 8, 8, 3)).astype(np.float32)
  target = np.asarray(patch_targets(jnp.asarray(images), 4, norm_pix_loss=True))
  patch0 = images[0, :4, :4].reshape(-1)
  expected = (patch0 - patch0.mean()) / np.sqrt(patch0.var(ddof=1) + 1e-6)
  np.testing.assert_allclose(target[0, 0], expected, rtol=1e-5, atol=1e-6)
  raw = np.asarray(patch_targets(jnp.asarray(images), 4, norm_pix_loss=False))
  np.testing.assert_array_equal(raw[0, 0], patch0)
