"""Mask tokens before the encoder: SimMIM (default) or an MAE-style variant.

  python train.py --config configs/simmim.py --workdir runs/simmim                 # digits, CPU
  python train.py --config configs/simmim.py:data=cifar10,model=vit_tiny --workdir runs/simmim_c10
  python train.py --config configs/simmim.py:variant=mae_style --workdir runs/simmim_mae_style
  python train.py --config configs/simmim.py:data=imagenet2012,model=vit_base,img=224 --workdir ...
Arg keys: model, data, img, patch (see configs/mae.py) and variant:
  simmim   32-px mask units (one patch on images under 128 px), ratio 0.6, linear head, L1;
  mae_style  random patches, ratio 0.75, transformer decoder (config.decoder sizes), MSE.
Each choice is also a key: --config.simmim.masking/mask_unit/mask_ratio/decoder/loss.
"""
import ml_collections

from sjmae_jax import config_lib

VARIANTS = {
    "simmim": dict(masking="units", mask_ratio=0.6, decoder="linear", loss="l1"),
    "mae_style": dict(masking="patches", mask_ratio=0.75, decoder="transformer", loss="mse"),
}


def get_config(arg=None):
  config = config_lib.pretrain_config(arg, method="simmim", views=("simmim",), variant="simmim")
  if config.arg.variant not in VARIANTS:
    raise ValueError(f"config arg variant={config.arg.variant!r}: unknown "
                     f"(known: {sorted(VARIANTS)})")
  # SimMIM's augmentation: RandomResizedCrop(scale 0.67-1) + flip.
  config.data.recipes.simmim = ml_collections.ConfigDict(
      dict(config.data.recipes.mae.to_dict(), rrc_scale=(0.67, 1.0)))
  if config.arg.data != "digits":
    # SimMIM ViT-B: AdamW (0.9, 0.999), lr 1e-4 per 512 images (= blr 5e-5 per 256), warmup 10.
    config.blr, config.warmup_epochs = 5e-5, 10.0
    config.optim.b2 = 0.999
  config.simmim = dict(
      mask_unit=32,          # px, for masking='units'
      norm_pix_loss=False,   # SimMIM predicts the normalised image itself
      **VARIANTS[config.arg.variant],
  )
  return config.lock()
