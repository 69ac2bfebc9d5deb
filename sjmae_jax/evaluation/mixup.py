"""Mixup / CutMix with timm's semantics (timm.data.Mixup, mode 'batch'), inside the jitted step.

One draw per global batch: with probability `prob`, either CutMix (with probability
`switch_prob` when both are on) with lam ~ Beta(cutmix_alpha, cutmix_alpha), or mixup with
lam ~ Beta(mixup_alpha, mixup_alpha). Every image is mixed with the batch reversed (image i with
image B-1-i). CutMix pastes a box of side sqrt(1 - lam) x (H, W) centred at a uniform pixel,
clipped to the image, and lam is corrected to the area actually kept. Targets are
lam * smooth(y) + (1 - lam) * smooth(reversed y), smooth = one-hot with label smoothing
(off value smoothing / C), so each target row sums to 1.
"""
import jax
import jax.numpy as jnp


def smooth_one_hot(labels, num_classes: int, smoothing: float):
  off = smoothing / num_classes
  return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + off


def cutmix_box(rng, lam, height: int, width: int):
  """timm's rand_bbox: (top, bottom, left, right) of a box of about (1 - lam) of the image."""
  ratio = jnp.sqrt(1.0 - lam)
  cut_h = jnp.floor(height * ratio).astype(jnp.int32)
  cut_w = jnp.floor(width * ratio).astype(jnp.int32)
  y_rng, x_rng = jax.random.split(rng)
  cy = jax.random.randint(y_rng, (), 0, height)
  cx = jax.random.randint(x_rng, (), 0, width)
  top = jnp.clip(cy - cut_h // 2, 0, height)
  bottom = jnp.clip(cy + (cut_h + 1) // 2, 0, height)
  left = jnp.clip(cx - cut_w // 2, 0, width)
  right = jnp.clip(cx + (cut_w + 1) // 2, 0, width)
  return top, bottom, left, right


def mix(rng, images, labels, num_classes: int, *, mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0, switch_prob: float = 0.5, prob: float = 1.0,
        label_smoothing: float = 0.1):
  """(images (B, H, W, C), int labels (B,)) -> (mixed images, soft targets (B, C), lam)."""
  targets = smooth_one_hot(labels, num_classes, label_smoothing)
  if mixup_alpha <= 0 and cutmix_alpha <= 0:
    return images, targets, jnp.ones((), jnp.float32)
  gate_rng, switch_rng, mixup_rng, cutmix_rng, box_rng = jax.random.split(rng, 5)
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(switch_rng) < switch_prob
  else:
    use_cutmix = jnp.asarray(cutmix_alpha > 0)
  lam_mixup = jax.random.beta(mixup_rng, max(mixup_alpha, 1e-3), max(mixup_alpha, 1e-3))
  lam_cutmix = jax.random.beta(cutmix_rng, max(cutmix_alpha, 1e-3), max(cutmix_alpha, 1e-3))
  lam = jnp.where(use_cutmix, lam_cutmix, lam_mixup)
  lam = jnp.where(jax.random.uniform(gate_rng) < prob, lam, 1.0)

  height, width = images.shape[1:3]
  top, bottom, left, right = cutmix_box(box_rng, lam, height, width)
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  in_box = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
  box_lam = 1.0 - (bottom - top) * (right - left) / (height * width)
  reversed_images = images[::-1]
  cutmixed = jnp.where(in_box[None, :, :, None], reversed_images, images)
  mixed_up = lam * images + (1.0 - lam) * reversed_images
  images = jnp.where(use_cutmix, cutmixed, mixed_up)
  lam = jnp.where(use_cutmix, box_lam, lam).astype(jnp.float32)
  targets = lam * targets + (1.0 - lam) * targets[::-1]
  return images, targets, lam
