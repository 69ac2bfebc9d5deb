"""MAE pretraining (He et al. 2021).

  python train.py --config configs/mae.py --workdir runs/mae                # digits, CPU, minutes
  python train.py --config configs/mae.py:data=cifar10,model=vit_tiny --workdir runs/mae_c10
  python train.py --config configs/mae.py:data=imagenet2012,model=vit_base --workdir gs://...
Arg keys: model (vit_micro|vit_tiny|vit_small|vit_base|vit_large|vit_huge), data (digits|cifar10|
tfds name|folder:PATH), img (image size; default per dataset).
"""
from sjmae_jax import config_lib


def get_config(arg=None):
  config = config_lib.pretrain_config(arg, method="mae", views=("mae",))
  config.mae = dict(mask_ratio=0.75, norm_pix_loss=True)
  return config.lock()
