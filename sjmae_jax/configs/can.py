"""CAN pretraining (Mishra et al. 2022): contrastive + masked autoencoder + denoising.

  python train.py --config configs/can.py --workdir runs/can                # digits, CPU, minutes
  python train.py --config configs/can.py:data=cifar10,model=vit_tiny --workdir runs/can_c10
  python train.py --config configs/can.py:data=imagenet2012,model=vit_base,img=224 --workdir ...
Arg keys: model, data, img, patch (see configs/mae.py). Loss weights: --config.can.w_mae / w_noise /
w_simclr (official 0.97 / 0.3 / 0.03); --config.can.w_noise=0 trains CAN without denoising.
"""
from sjmae_jax import config_lib


def get_config(arg=None):
  config = config_lib.pretrain_config(arg, method="can", views=("simclr", "simclr"))
  if config.arg.data != "digits":  # the official command: blr 2.5e-4 (warmup 40, as MAE)
    config.blr = 2.5e-4
  # main_pretrain.py: torchvision's RandomResizedCrop default, bilinear (MAE's is bicubic).
  config.data.recipes.simclr.interpolation = "bilinear"
  config.can = dict(
      mask_ratio=0.75,        # official code; the paper uses 0.5
      norm_pix_loss=False,    # the official command runs without it; MAE's default is True
      w_mae=0.97, w_noise=0.3, w_simclr=0.03,
      temperature=0.1,
      projection_dim=128,
      noise_std=0.1,          # sigma ~ U(0, noise_std) per image (the model's default in the code)
      sigma_embed_dim=128,
      noise_head="shared",    # | separate (a second Linear on the decoder's normed tokens)
  )
  return config.lock()
