"""Shared pieces of the config files: `key=value` args, model/data presets, the pretraining base.

Config files stay config-as-code (`configs/<method>.py:get_config(arg)`); this module holds what
every pretraining config shares so that a new method's config only states what differs.
"""
import os
import re

import ml_collections

from sjmae_jax import data as data_lib
from sjmae_jax.models.sizes import SIZES


# name -> (variant, embed_dim, depth, num_heads): vit_{size} for the standard sizes (their widths
# come from the variant), and 'vit_micro', the CPU-sized demo encoder.
MODELS = {"vit_micro": ("custom", 128, 4, 4), **{f"vit_{size}": (size, 0, 0, 0) for size in SIZES}}


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
  """An ImageFolder copy of CIFAR-10 (ROOT/{train,test}/<class>/*), from $SJMAE_CIFAR10_DIR; ''
  when unset (data=cifar10 then reads TFDS's cifar10)."""
  return os.environ.get("SJMAE_CIFAR10_DIR", "")


def data_config(name: str, img: int, views: tuple) -> ml_collections.ConfigDict:
  """Data presets: 'digits' (offline default), 'cifar10' (the ImageFolder at $SJMAE_CIFAR10_DIR,
  else TFDS's cifar10), any TFDS name, or 'folder:PATH'."""
  cfg = data_lib.default_config()
  cfg.img_size = img
  cfg.views = list(views)
  if name == "digits":
    cfg.source = "digits"
  elif name == "cifar10":
    cfg.source = f"folder:{cifar10_dir()}" if cifar10_dir() else "tfds:cifar10"
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
      remat=False, remat_policy="",
      # Step speed levers (docs/performance.md); these defaults are the plain forms.
      norm_impl="flax", gelu_impl="flax", gelu_approximate=False, gather_impl="take",
      cast_params_once=False))


def default_model_args(args) -> tuple[int, int, str]:
  """(img, patch, model name) from a config arg's data/img/patch/model, dataset defaults filled in:
  vit_micro on digits, vit_tiny up to 64 px, vit_base above."""
  img, patch = default_img_and_patch(args.data, args.img, args.patch)
  model = args.model or ("vit_micro" if args.data == "digits" else
                         "vit_tiny" if img <= 64 else "vit_base")
  return img, patch, model


def default_img_and_patch(data: str, img: int, patch: int) -> tuple[int, int]:
  """Image size and patch size per dataset: 16/4 digits, 32/4 CIFAR-size, 224/16 otherwise."""
  if not img:
    img = {"digits": 16, "cifar10": 32}.get(data, 224)
  return img, patch or (4 if img <= 64 else 16)


def pretrain_config(arg, *, method: str, views=("mae",), **arg_defaults) -> ml_collections.ConfigDict:
  """Base pretraining config. Arg keys: model, data, img, patch (0 = dataset default), + the caller's."""
  args = parse_arg(arg, model="", data="digits", img=0, patch=0, **arg_defaults)
  on_digits = args.data == "digits"
  img, patch, model = default_model_args(args)

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
  # Stop early (as stop_at_step) once this many minutes of training have passed, counted from the
  # end of the first (compiling) step; 0 = off. A time budget: the schedule is unchanged, so set
  # epochs to what fits for the lr to reach its end.
  config.stop_after_minutes = 0.0
  config.init_from = ""    # workdir or weights file whose encoder initialises this run
  # A step whose loss or gradient norm is not finite: 'stop' (error naming the step and the loss
  # terms; no checkpoint is written from the bad state) or 'skip' (the update is dropped; counted
  # in the `nonfinite_steps` metric).
  config.nonfinite = "stop"
  # Test hook: the images of this step (1-based, as logged) are multiplied by NaN; 0 = off.
  config.debug = ml_collections.ConfigDict(dict(poison_step=0))
  # kNN monitor (sjmae_jax/evaluation/knn.py): weighted kNN top-1 (DINO: k 20, cosine, T 0.07) of
  # CLS features, logged as knn/top1 every `every_epochs` (0 = off) and at the end. num_train /
  # num_eval: class-balanced subsets of the train / eval split (0 = the whole split).
  config.knn = ml_collections.ConfigDict(dict(
      every_epochs=20 if on_digits else 50, num_train=10_000, num_eval=10_000, k=20,
      temperature=0.07, batch_size=0))  # batch_size 0 = the pretraining batch per micro-step
  config.arg = args  # what get_config was called with, for the record
  return config


NONFINITE_POLICIES = ("stop", "skip")
COMPUTE_DTYPES = ("float32", "bfloat16")
SHARDING_STRATEGIES = ("fsdp", "replicate")


def validate(config, num_devices: int | None = None) -> None:
  """Impossible values fail here, before anything is compiled or written, with one line naming
  the key. `num_devices` (the devices of the data x fsdp mesh) enables the mesh and batch checks."""
  model = config.model
  if model.img_size <= 0 or model.patch_size <= 0:
    raise ValueError(f"config model.img_size/patch_size: must be positive, got "
                     f"{model.img_size}/{model.patch_size}")
  if model.img_size % model.patch_size:
    raise ValueError(f"config model.img_size: {model.img_size} is not divisible by "
                     f"model.patch_size {model.patch_size}")
  if model.img_size != config.data.img_size:
    raise ValueError(f"config data.img_size: {config.data.img_size} differs from model.img_size "
                     f"{model.img_size}")
  for block_name in ("model", "decoder"):
    block = config.get(block_name)
    if block and block.get("embed_dim") and block.get("num_heads") and (
        block.embed_dim % block.num_heads):
      raise ValueError(f"config {block_name}.embed_dim: {block.embed_dim} is not divisible by "
                       f"{block_name}.num_heads {block.num_heads}")
  if not 0.0 <= model.get("drop_path_rate", 0.0) < 1.0:
    raise ValueError(f"config model.drop_path_rate: {model.drop_path_rate} must be in [0, 1)")
  _validate_mask_ratios(config, num_patches=(model.img_size // model.patch_size) ** 2)
  _validate_views(config.data)

  if config.batch_size <= 0 or config.grad_accum_steps <= 0:
    raise ValueError(f"config batch_size/grad_accum_steps: must be positive, got "
                     f"{config.batch_size}/{config.grad_accum_steps}")
  if config.epochs <= 0:
    raise ValueError(f"config epochs: must be positive, got {config.epochs}")
  for key in ("warmup_epochs", "blr", "lr", "min_lr", "stop_at_step", "stop_after_minutes",
              "picture_every_steps"):
    if config.get(key, 0) < 0:
      raise ValueError(f"config {key}: must be >= 0, got {config[key]}")
  for key, value in (("log_every_steps", config.log_every_steps),
                     ("checkpoint.every_steps", config.checkpoint.every_steps),
                     ("checkpoint.keep", config.checkpoint.keep)):
    if value < 1:
      raise ValueError(f"config {key}: must be >= 1, got {value}")
  optim = config.optim
  if not (0.0 <= optim.b1 < 1.0 and 0.0 <= optim.b2 < 1.0):
    raise ValueError(f"config optim.b1/b2: must be in [0, 1), got {optim.b1}/{optim.b2}")
  if optim.get("eps", 1e-8) <= 0 or optim.weight_decay < 0 or optim.get("clip_grad_norm", 0) < 0:
    raise ValueError(f"config optim: eps must be > 0, weight_decay and clip_grad_norm >= 0 (got "
                     f"{optim.get('eps')}, {optim.weight_decay}, {optim.get('clip_grad_norm')})")
  if config.compute_dtype not in COMPUTE_DTYPES:
    raise ValueError(f"config compute_dtype: {config.compute_dtype!r} is not one of "
                     f"{list(COMPUTE_DTYPES)}")
  if config.get("nonfinite", "stop") not in NONFINITE_POLICIES:
    raise ValueError(f"config nonfinite: {config.nonfinite!r} is not one of "
                     f"{list(NONFINITE_POLICIES)}")
  if config.get("debug") and config.debug.get("poison_step", 0) < 0:
    raise ValueError(f"config debug.poison_step: must be >= 0, got {config.debug.poison_step}")
  _validate_sharding(config.sharding)
  if num_devices is not None:
    _validate_mesh_and_batch(config, num_devices)


def _validate_mask_ratios(config, num_patches: int) -> None:
  """Every `mask_ratio*` key of every block: in [0, 1) and keeping at least one patch."""
  for block_name, block in config.items():
    if not isinstance(block, ml_collections.ConfigDict) or block_name in ("data", "arg"):
      continue
    for key, ratio in block.items():
      if not key.startswith("mask_ratio") or not isinstance(ratio, (int, float)):
        continue
      if not 0.0 <= ratio < 1.0:
        raise ValueError(f"config {block_name}.{key}: {ratio} must be in [0, 1)")
      if int(num_patches * (1 - ratio)) < 1:
        raise ValueError(f"config {block_name}.{key}: {ratio} keeps no patch of the "
                         f"{num_patches} (model.img_size / model.patch_size squared)")


def _validate_views(data_config) -> None:
  views = list(data_config.views)
  if not views:
    raise ValueError("config data.views: empty (expected recipe names, e.g. ['simclr', 'simclr'])")
  unknown = [view for view in views if view not in data_config.recipes]
  if unknown:
    raise ValueError(f"config data.views: unknown recipe(s) {unknown} (data.recipes: "
                     f"{sorted(data_config.recipes)})")


def _validate_sharding(sharding_config) -> None:
  for rule in sharding_config.rules:
    if len(rule) != 2 or rule[1] not in SHARDING_STRATEGIES:
      raise ValueError(f"config sharding.rules: {tuple(rule)} is not a (regex, "
                       f"{' | '.join(SHARDING_STRATEGIES)}) pair")
    try:
      re.compile(rule[0])
    except re.error as e:
      raise ValueError(f"config sharding.rules: bad regex {rule[0]!r}: {e}") from None
  if sharding_config.min_size < 0:
    raise ValueError(f"config sharding.min_size: must be >= 0, got {sharding_config.min_size}")


def _validate_mesh_and_batch(config, num_devices: int) -> None:
  data, fsdp = int(config.mesh.data), int(config.mesh.fsdp)
  if data == -1 and fsdp == -1:
    raise ValueError("config mesh: only one of data/fsdp may be -1")
  data = num_devices // fsdp if data == -1 and fsdp > 0 else data
  fsdp = num_devices // data if fsdp == -1 and data > 0 else fsdp
  if data < 1 or fsdp < 1 or data * fsdp != num_devices:
    raise ValueError(f"config mesh: data={config.mesh.data} x fsdp={config.mesh.fsdp} does not "
                     f"match the {num_devices} available devices")
  per_step = config.grad_accum_steps * num_devices
  if config.batch_size % per_step:
    raise ValueError(f"config batch_size: {config.batch_size} is not divisible by "
                     f"grad_accum_steps ({config.grad_accum_steps}) x data-parallel devices "
                     f"({num_devices} = mesh data {data} x fsdp {fsdp})")
