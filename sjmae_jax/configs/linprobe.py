"""MAE linear probe of a pretrained encoder (eval_linprobe.py).

  python eval_linprobe.py --config configs/linprobe.py --workdir runs/probe --config.init_from=runs/mae
  python eval_linprobe.py --config configs/linprobe.py:data=cifar10 --workdir runs/probe_c10 \
      --config.init_from=runs/mae_c10 --config.mode=fast
  python eval_linprobe.py --config configs/linprobe.py:data=imagenet2012,model=vit_base \
      --workdir runs/probe_b --config.init_from=mae_pretrain_vit_base.pth
Arg keys: data (digits|cifar10|tfds name|folder:PATH), img, patch, model (only for a weights
file; a pretraining workdir's config.json gives the architecture).
config.mode: 'fast' (cached features, no augmentation: seconds), 'full' (the protocol), 'both'.
"""
import ml_collections

from sjmae_jax import config_lib


def get_config(arg=None):
  config = config_lib.evaluation_config(arg, views=("linprobe",), global_pool="token")  # MAE's
  on_digits = config.arg.data == "digits"
  config.mode = "both"
  # MAE main_linprobe: RandomResizedCrop(scale 0.08-1, bicubic) + flip; eval resize + center crop.
  config.data.recipes.linprobe = dict(config.data.recipes.mae.to_dict(), rrc_scale=(0.08, 1.0))

  config.batch_size = 256 if on_digits else 1024  # MAE: 16384 on ImageNet
  config.epochs = 90
  config.warmup_epochs = 10.0
  # MAE: blr 0.1 (lr 6.4 at batch 16384, ~7000 steps on ImageNet). LARS moves a weight matrix by
  # about lr x 0.001 of its norm per step, so with few steps (small data sets) blr 0.1 leaves the
  # head near its init: digits (5 steps / epoch) and CIFAR (48) use a larger blr.
  config.blr = config_lib.probe_blr(config.arg.data)
  config.lr = 0.0  # absolute peak lr; 0 = blr * batch_size / 256
  config.min_lr = 0.0
  # LARS (momentum 0.9, trust 0.001, no weight decay); the encoder (and the untrained fc_norm of
  # global_pool='avg') is frozen: lr multiplier 0.
  config.optim = config_lib.optim_config(name="lars", weight_decay=0.0,
                                         lr_mults=((r"(encoder|fc_norm)/.*", 0.0),))
  config.head_init_std = 0.01
  config_lib.add_run_keys(config, checkpoint_every=dict(every_epochs=10),
                          log_every_steps=10 if on_digits else 100)
  config.checkpoint.keep = 1
  config.monitors = ml_collections.ConfigDict(dict(
      eval=dict(type="classification", every_epochs=10)))  # top-1 / top-5 on data.eval_split
  if config.arg.data == "cifar10":  # CIFAR's training crop (config_lib.cifar10_recipes); the
    # probe scores the whole test image (data.eval_crop_fraction 1.0)
    config.data.recipes.linprobe.update(crop="pad_crop", pad=4)
  if on_digits:  # 8x8 digits: a flip or an 8% crop changes or erases the class
    config.data.recipes.linprobe.update(flip_prob=0.0, rrc_scale=(0.35, 1.0))
  return config.lock()
