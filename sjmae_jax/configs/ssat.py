"""SSAT: supervised ViT training with an MAE auxiliary task, and its FGCR extension.

  python train.py --config configs/ssat.py --workdir runs/ssat                    # digits, CPU
  python train.py --config configs/ssat.py:data=cifar10,model=vit_tiny --workdir runs/ssat_c10
  python train.py --config configs/ssat.py:data=cifar10,variant=fgcr --workdir runs/fgcr_c10
Arg keys: model, data, img, patch (see configs/mae.py) and variant:
  ssat  L = lam * CE + (1 - lam) * L_mae, one masked view;
  fgcr  + 3 disjoint masked views and the decoder-cls consistency term (beta 1e-3).
Reports loss/ce, loss/mae, loss/consistency, train/top1 every log step and eval/top1 on
data.eval_split every epoch. ssat.num_classes=0 reads the class count from the dataset.
"""
from sjmae_jax import config_lib
from sjmae_jax import data as data_lib

VARIANTS = {"ssat": dict(views=1, beta=0.0), "fgcr": dict(views=3, beta=1e-3)}
NUM_CLASSES = {"digits": 10, "cifar10": 10, "cifar100": 100, "imagenet2012": 1000}
# CIFAR-10 statistics, as the original normalises CIFAR-10 (ImageNet's elsewhere).
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


def get_config(arg=None):
  config = config_lib.pretrain_config(arg, method="ssat", views=("mae",), variant="ssat")
  if config.arg.variant not in VARIANTS:
    raise ValueError(f"config arg variant={config.arg.variant!r}: unknown "
                     f"(known: {sorted(VARIANTS)})")
  # timm's fine-tuning transform: RRC(0.08-1) + flip + RandAugment m9 + random erasing 0.25.
  config.data.views = ["finetune"]
  if config.arg.data == "cifar10":
    config.data.normalize, config.data.mean, config.data.std = "custom", CIFAR10_MEAN, CIFAR10_STD
    # The original's views also on CIFAR (not data=cifar10's pad-crop fine-tuning recipe).
    config.data.recipes.finetune = data_lib.default_config().recipes.finetune
  config.decoder.embed_dim, config.decoder.depth, config.decoder.num_heads = 128, 2, 16
  config.optim.b2 = 0.999  # torch AdamW defaults, as the original
  if config.arg.data != "digits":  # the original: lr 1e-3 (absolute), 100 epochs, warmup 5
    config.lr, config.epochs, config.warmup_epochs, config.min_lr = 1e-3, 100, 5.0, 1e-6
  config.ssat = dict(
      num_classes=NUM_CLASSES.get(config.arg.data, 0),
      lam=0.1,                 # L = lam * CE + (1 - lam) * (L_mae + beta * L_consistency)
      label_smoothing=0.1,
      mask_ratio=0.75,
      norm_pix_loss=False,     # off in the original
      offdiag_target=-1.0,     # the original's (c_ij + 1)^2; 0.0 = Barlow Twins' c_ij^2
      **VARIANTS[config.arg.variant],
  )
  # The head's top-1 / top-5 on data.eval_split, every epoch and at the end (eval/top1).
  config.monitors.eval = dict(type="classification", every_epochs=1)
  return config.lock()
