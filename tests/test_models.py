import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sjmae_jax.models import posemb
from sjmae_jax.models.decoder import MAEDecoder
from sjmae_jax.models.vit import VisionTransformer, patchify, unpatchify


def reference_sincos(dim, grid):
  """Position (row r, col c) -> [sin(c w), cos(c w), sin(r w), cos(r w)], w_i = 1/10000^(i/(dim/4))."""
  quarter = dim // 4
  table = np.zeros((1 + grid * grid, dim))
  for r in range(grid):
    for c in range(grid):
      row = 1 + r * grid + c
      for i in range(quarter):
        w = 1.0 / 10000 ** (i / quarter)
        table[row, i] = np.sin(c * w)
        table[row, quarter + i] = np.cos(c * w)
        table[row, 2 * quarter + i] = np.sin(r * w)
        table[row, 3 * quarter + i] = np.cos(r * w)
  return table


@pytest.mark.parametrize("dim,grid", [(16, 3), (64, 4), (192, 14)])
def test_sincos_matches_reference(dim, grid):
  ours = posemb.sincos_2d(dim, grid)
  assert ours.shape == (1, 1 + grid * grid, dim)
  np.testing.assert_allclose(ours[0], reference_sincos(dim, grid), atol=1e-6)
  assert np.all(ours[0, 0] == 0)  # cls row


def tiny_vit(**kw):
  return VisionTransformer(**{**dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=4), **kw})


def test_vit_init_follows_mae():
  model = tiny_vit(embed_dim=64)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))["params"]
  qkv = np.asarray(params["blocks_0"]["attn"]["qkv"]["kernel"])  # (D, 3D) xavier as one matrix
  limit = np.sqrt(6 / (64 + 192))
  assert qkv.shape == (64, 192) and np.abs(qkv).max() <= limit and np.abs(qkv).max() > 0.9 * limit
  assert np.all(np.asarray(params["blocks_0"]["attn"]["qkv"]["bias"]) == 0)
  patch = np.asarray(params["patch_embed"]["proj"]["kernel"])  # xavier on [D, C*p*p]
  limit = np.sqrt(6 / (3 * 16 + 64))
  assert patch.shape == (4, 4, 3, 64) and limit * 0.9 < np.abs(patch).max() <= limit
  assert abs(np.asarray(params["cls_token"]).std() - 0.02) < 0.008
  np.testing.assert_allclose(np.asarray(params["pos_embed"]), posemb.sincos_2d(64, 4))
  assert np.all(np.asarray(params["norm"]["scale"]) == 1)


def test_patchify_order_and_roundtrip():
  images = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 3))
  patches = patchify(images, 4)
  assert patches.shape == (2, 4, 48)
  # patch 1 is row 0, column 1; inside a patch the order is (p, q, c)
  np.testing.assert_array_equal(patches[0, 1].reshape(4, 4, 3), images[0, 0:4, 4:8])
  np.testing.assert_array_equal(unpatchify(patches, 4, 3), images)


def test_conv_patch_embed_equals_patchify_matmul():
  model = tiny_vit()
  images = jax.random.normal(jax.random.PRNGKey(2), (2, 16, 16, 3))
  variables = model.init(jax.random.PRNGKey(0), images)
  proj = variables["params"]["patch_embed"]["proj"]
  expected = patchify(images, 4) @ proj["kernel"].reshape(-1, 32) + proj["bias"]
  got = model.apply(variables, images, method=lambda m, x: m.embed_patches(x))
  np.testing.assert_allclose(got, expected, atol=1e-5)


def test_keep_ids_encode_only_the_kept_patches_with_their_positions():
  model = tiny_vit()
  images = jax.random.normal(jax.random.PRNGKey(3), (2, 16, 16, 3))
  variables = model.init(jax.random.PRNGKey(0), images)
  keep = jnp.array([[5, 0, 9], [15, 3, 4]])
  out = model.apply(variables, images, keep_ids=keep)
  assert out.shape == (2, 4, 32)
  # Changing a removed patch's pixels leaves the output unchanged; changing a kept one does not.
  removed_changed = images.at[0, 4:8, 4:8].add(5.0)  # patch 5 (row 1, col 1) is kept for sample 0
  assert not np.allclose(model.apply(variables, removed_changed, keep_ids=keep)[0], out[0])
  kept_unchanged = images.at[0, 0:4, 4:8].add(5.0)  # patch 1 is removed for sample 0
  np.testing.assert_allclose(model.apply(variables, kept_unchanged, keep_ids=keep)[0], out[0], atol=1e-6)


def test_decoder_places_tokens_back_in_original_order():
  # depth 0: no attention, so output slot i depends only on the token unshuffled into slot i.
  dec = MAEDecoder(num_patches=4, out_dim=5, embed_dim=8, depth=0, num_heads=2)
  tokens = jax.random.normal(jax.random.PRNGKey(0), (1, 3, 16))  # cls + 2 kept tokens
  ids_restore = jnp.array([[2, 0, 3, 1]])  # slot 1 <- kept 0, slot 3 <- kept 1, slots 0, 2 <- mask
  variables = dec.init(jax.random.PRNGKey(1), tokens, ids_restore)
  base = dec.apply(variables, tokens, ids_restore)
  changed = lambda row: np.abs(dec.apply(variables, tokens.at[0, row].add(3.0), ids_restore) - base
                               ).max(axis=-1)[0] > 1e-6
  np.testing.assert_array_equal(changed(1), [False, True, False, False])
  np.testing.assert_array_equal(changed(2), [False, False, False, True])
  np.testing.assert_array_equal(changed(0), [False, False, False, False])  # cls output is dropped
  # mask-token slots differ only by their position embedding
  pos = variables["params"]["decoder_pos_embed"][0]
  assert not np.allclose(base[0, 0], base[0, 2]) and not np.allclose(pos[1], pos[3])


def test_timm_trunc_normal_is_untruncated_at_small_std():
  # timm's trunc_normal_(std) cuts at +-2 absolute; flax's default cuts at +-2 std, which would
  # cap every head weight at 2 * std and shrink the spread (MAE head: std 2e-5 and 0.01).
  from sjmae_jax.models.vit import timm_trunc_normal
  for std in (2e-5, 0.01):
    w = np.asarray(timm_trunc_normal(std)(jax.random.PRNGKey(1), (400, 500)))
    assert abs(w.std() / std - 1) < 0.01
    assert np.abs(w).max() > 4 * std  # 200k draws of N(0, std^2) reach about 4.5 std
