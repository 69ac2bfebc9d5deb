"""Shared pieces of the config files: `key=value` args, model/data presets, the pretraining base.

Config files stay config-as-code (`configs/<method>.py:get_config(arg)`); this module holds what
every pretraining config shares so that a new method's config only states what differs.
"""
import os
from pathlib import Path

import ml_collections

from sjmae_jax import data as data_lib

REPO_ROOT = Path(__file__).resolve().parent.parent

# name -> (variant, embed_dim, depth, num_heads); 'vit_micro' is the CPU-sized demo encoder.
MODELS = {
    "vit_micro": ("custom", 128, 4, 4),
    "vit_tiny": ("tiny", 0, 0, 0),
    "vit_small": ("small", 0, 0, 0),
    "vit_base": ("base", 0, 0, 0),
    "vit_large": ("large", 0, 0, 0),
    "vit_huge": ("huge", 0, 0, 0),
}


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """'model=vit_small,data=cifar10' -> ConfigDict over `defaults`; unknown keys are errors."""
  result = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    if "=" not in item:
      raise ValueError(f"config arg {item!r}: expected key=value (known keys: {sorted(defaults)})")
    key, value = item.split("=", 1)
    if key not in defaults:
      raise ValueError(f"config arg {key!r}: unknown key (known keys: {sorted(defaults)})")
    default = defaults[key]
    result[key] = type(default)(value) if default is not None else value
  return result


def cifar10_dir() -> str:
  return os.environ.get("SJMAE_CIFAR10_DIR", str(REPO_ROOT.parent / "shared" / "data" / "cifar10"))


def data_config(name: str, img: int, views: tuple) -> ml_collections.ConfigDict:
  """Data presets: 'digits' (offline default), 'cifar10' (ImageFolder), or any 'tfds:NAME'."""
  cfg = data_lib.default_config()
  cfg.img_size = img
  cfg.views = list(views)
  if name == "digits":
    cfg.source = "digits"
  elif name == "cifar10":
    cfg.source = f"folder:{cifar10_dir()}"
    cfg.train_split, cfg.eval_split = "train", "test"
  elif name.startswith(("tfds:", "folder:")):
    cfg.source = name
  else:
    cfg.source = f"tfds:{name}"
  return cfg


def model_config(name: str, img: int, patch: int) -> ml_collections.ConfigDict:
  if name not in MODELS:
    raise ValueError(f"config arg model={name!r}: unknown model (known: {sorted(MODELS)})")
  variant, dim, depth, heads = MODELS[name]
  return ml_collections.ConfigDict(dict(
      variant=variant, embed_dim=dim, depth=depth, num_heads=heads, img_size=img, patch_size=patch,
      in_chans=3, mlp_ratio=4.0, drop_path_rate=0.0, layer_scale_init=0.0, attention_impl="",
      remat=False))


def default_img_and_patch(data: str, img: int, patch: int) -> tuple[int, int]:
  """Image size and patch size per dataset: 16/4 digits, 32/4 CIFAR-size, 224/16 otherwise."""
  if not img:
    img = {"digits": 16, "cifar10": 32}.get(data, 224)
  return img, patch or (4 if img <= 64 else 16)


def pretrain_config(arg, *, method: str, views=("mae",), **arg_defaults) -> ml_collections.ConfigDict:
  """Base pretraining config. Arg keys: model, data, img, patch (0 = dataset default), + the caller's."""
  args = parse_arg(arg, model="", data="digits", img=0, patch=0, **arg_defaults)
  on_digits = args.data == "digits"
  img, patch = default_img_and_patch(args.data, args.img, args.patch)
  model = args.model or ("vit_micro" if on_digits else "vit_tiny" if img <= 64 else "vit_base")

  config = ml_collections.ConfigDict()
  config.method = method
  config.seed = 0
  config.model = model_config(model, img, patch)
  config.decoder = ml_collections.ConfigDict(dict(
      embed_dim=128 if on_digits else 512, depth=2 if on_digits else 8,
      num_heads=4 if on_digits else 16, mask_token_mode="shared"))
  config.data = data_config(args.data, img, views)

  config.batch_size = 128 if on_digits else 4096  # effective global batch (all hosts, all micro-steps)
  config.grad_accum_steps = 1
  config.epochs = 60 if on_digits else 800
  config.warmup_epochs = 5.0 if on_digits else 40.0
  config.blr = 1.5e-3 if on_digits else 1.5e-4
  config.lr = 0.0        # absolute peak lr; 0 = blr * batch_size / 256
  config.min_lr = 0.0
  config.optim = ml_collections.ConfigDict(dict(
      b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.05, clip_grad_norm=0.0,
      frozen_params=(".*pos_embed",)))  # the fixed sin-cos tables are not trained (MAE)
  config.compute_dtype = "float32"  # or bfloat16 (params and loss math stay float32)

  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
  config.sharding = ml_collections.ConfigDict(dict(rules=((".*", "fsdp"),), min_size=2 ** 14))
  # Multi-host: jax.distributed.initialize(); empty fields are auto-detected (TPU VMs, SLURM).
  config.distributed = ml_collections.ConfigDict(dict(
      enabled=False, coordinator_address="", num_processes=0, process_id=-1,
      cpu_collectives="gloo"))

  config.checkpoint = ml_collections.ConfigDict(dict(every_steps=200 if on_digits else 1000,
                                                     keep=3, async_save=True))
  config.log_every_steps = 20 if on_digits else 100
  config.picture_every_steps = 200 if on_digits else 5000  # 0 = never
  config.stop_at_step = 0  # stop early (with a checkpoint) at this step; the schedule is unchanged
  config.init_from = ""    # workdir or weights file whose encoder initialises this run
  config.arg = args  # what get_config was called with, for the record
  return config


def validate(config) -> None:
  """Impossible values fail here, before anything is compiled, with one line naming the key."""
  model = config.model
  if model.img_size % model.patch_size:
    raise ValueError(f"config model.img_size: {model.img_size} is not divisible by "
                     f"model.patch_size {model.patch_size}")
  if model.img_size != config.data.img_size:
    raise ValueError(f"config data.img_size: {config.data.img_size} differs from model.img_size "
                     f"{model.img_size}")
  for block in ("mae", "sjmae", "can", "simmim", "ssat"):
    ratio = config.get(block, {}).get("mask_ratio", None)
    if ratio is not None and not 0.0 <= ratio < 1.0:
      raise ValueError(f"config {block}.mask_ratio: {ratio} must be in [0, 1)")
  if config.batch_size <= 0 or config.grad_accum_steps <= 0:
    raise ValueError(f"config batch_size/grad_accum_steps: must be positive, got "
                     f"{config.batch_size}/{config.grad_accum_steps}")
  if config.epochs <= 0:
    raise ValueError(f"config epochs: must be positive, got {config.epochs}")
