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
  else TFDS's cifar10), any TFDS name, 'folder:PATH' or 'arrayrecord:DIR' (data.prepare)."""
  cfg = data_lib.default_config()
  cfg.img_size = img
  cfg.views = list(views)
  if name == "digits":
    cfg.source = "digits"
  elif name == "cifar10":
    cfg.source = f"folder:{cifar10_dir()}" if cifar10_dir() else "tfds:cifar10"
    cfg.train_split, cfg.eval_split = "train", "test"
    cifar10_recipes(cfg)
  elif name.startswith(("tfds:", "folder:", "arrayrecord:")):
    cfg.source = name
  else:
    cfg.source = f"tfds:{name}"
  return cfg


def cifar10_recipes(cfg) -> None:
  """CIFAR-10's views in place of ImageNet's (which stay the default for every other dataset).

  ImageNet's recipes at 32 px crop down to 8 % of the image (a 9 px window) and score a 36 px
  resize's centre; the public CIFAR ViT recipes train on pad-and-crop views and score the whole
  image (omihub777/ViT-CIFAR, SHI-Labs/Compact-Transformers, aanna0701/SPT_LSA_ViT: RandomCrop(32,
  padding=4) + flip for training, no resize or crop at test time).
  """
  # The whole 32 px test image (kNN monitor, probe and fine-tune evaluation): no resize, no crop.
  cfg.eval_crop_fraction = 1.0
  # Reconstruction / jigsaw views: light crops. MAE pretrains with crops alone (its Table 1(f):
  # RandomResizedCrop(0.2-1) + flip is best); at 32 px a 20 % area is a 14 px window of an object
  # that often fills the frame, so the floor is raised to 35 % (the scale the digits demo uses).
  cfg.recipes.mae.update(rrc_scale=(0.35, 1.0))
  # Contrastive (SJ-MAE, CAN) views: SimCLR's colour distortion without the Gaussian blur, which
  # SimCLR leaves out on CIFAR-10 (Chen et al. 2020, appendix B.9), with the same light crops,
  # since SJ-MAE's reconstruction and jigsaw passes read these views too.
  cfg.recipes.simclr.update(rrc_scale=(0.35, 1.0), blur_prob=0.0)
  # Fine-tuning: pad-4 crop + flip + RandAugment (the CIFAR ViT recipes above; they use
  # AutoAugment's CIFAR policy or RandAugment), no random erasing (ViT-CIFAR trains without it;
  # a ~25-epoch schedule needs less regularization than the 100-300 epochs of CCT / SPT).
  cfg.recipes.finetune.update(crop="pad_crop", pad=4, random_erase_prob=0.0)


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
      qkv_impl="fused", cast_params_once=False))


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


def add_run_keys(config, *, checkpoint_every: dict, log_every_steps: int,
                 picture_every_steps: int = 0) -> None:
  """The keys of every training program (pretraining, fine-tuning, linear probe): what the engine
  (sjmae_jax/engine.py) reads. Durations are `<what>_steps | _epochs | _examples` (see `steps`)."""
  config.seed = 0
  config.grad_accum_steps = 1  # micro-steps per optimizer step (batch_size stays the global batch)
  config.compute_dtype = "float32"  # or bfloat16 (params and loss math stay float32)
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
  config.sharding = ml_collections.ConfigDict(dict(rules=((".*", "fsdp"),), min_size=2 ** 14))
  # Multi-host: jax.distributed.initialize(); empty fields are auto-detected (TPU VMs, SLURM).
  config.distributed = ml_collections.ConfigDict(dict(
      enabled=False, coordinator_address="", num_processes=0, process_id=-1,
      cpu_collectives="gloo"))
  config.checkpoint = ml_collections.ConfigDict(dict(keep=3, async_save=True, **checkpoint_every))
  config.log_every_steps = log_every_steps
  config.picture_every_steps = picture_every_steps  # 0 = never
  config.stop_at_step = 0  # stop early (with a checkpoint) at this step; the schedule is unchanged
  # Stop early (as stop_at_step) once this many minutes of training have passed, counted from the
  # end of the first (compiling) step; 0 = off. A time budget: the schedule is unchanged, so set
  # epochs to what fits for the lr to reach its end.
  config.stop_after_minutes = 0.0
  # A time budget that sizes the schedule instead (sjmae_jax/schedule_budget.py): the step speed
  # measured over budget_calibration_steps steps after compilation sets `epochs` (and
  # warmup_epochs = budget_warmup_fraction of them) so that warmup and decay complete after this
  # many minutes of training; the choice is kept in WORKDIR/budget.json for resumes. 0 = off.
  config.train_minutes = 0.0
  config.budget_warmup_fraction = 0.05
  config.budget_calibration_steps = 10
  # A step whose loss or gradient norm is not finite: 'stop' (error naming the step and the loss
  # terms; no checkpoint is written from the bad state) or 'skip' (the update is dropped; counted
  # in the `nonfinite_steps` metric).
  config.nonfinite = "stop"
  # Test hook: the images of this step (1-based, as logged) are multiplied by NaN; 0 = off.
  config.debug = ml_collections.ConfigDict(dict(poison_step=0))


def optim_config(**overrides) -> ml_collections.ConfigDict:
  """The optimizer policy (sjmae_jax/optim.py). `lr_mults` / `wd_mults`: (regex over the
  parameter path, multiplier) pairs, the first full match wins, default 1; an lr multiplier 0
  freezes (no optimizer state). `decay_1d=False`: no weight decay on 1-D parameters (biases,
  norms; MAE's and timm's rule). `layer_decay` < 1 adds MAE fine-tuning's layer-wise lr
  multipliers over the encoder's blocks."""
  optim = dict(
      name="adamw",  # 'adamw' | 'lars'
      b1=0.9, b2=0.95, eps=1e-8,  # adamw
      momentum=0.9, trust_coefficient=0.001,  # lars (facebookresearch/mae util/lars.py)
      weight_decay=0.05, clip_grad_norm=0.0,
      lr_mults=((".*pos_embed", 0.0),),  # the fixed sin-cos tables are not trained (MAE)
      wd_mults=(), decay_1d=False, layer_decay=1.0,
      # adamw's update over two flat vectors (decayed, not decayed) instead of one small
      # update per parameter (docs/performance.md, step speed levers)
      flatten=False)
  unknown = set(overrides) - set(optim)
  if unknown:
    raise ValueError(f"optim_config: unknown keys {sorted(unknown)}")
  optim.update(overrides)
  return ml_collections.ConfigDict(optim)


def knn_monitor(every_epochs: float, **overrides) -> dict:
  """kNN monitor (sjmae_jax/evaluation/knn.py): weighted kNN top-1 (DINO: k 20, cosine, T 0.07)
  of CLS features of a class-balanced subset of the train split (num_train, 0 = all) against the
  eval split (num_eval), logged as knn/top1; batch_size 0 = the training micro-batch."""
  return dict(type="knn", every_epochs=every_epochs, num_train=10_000, num_eval=10_000, k=20,
              temperature=0.07, batch_size=0, **overrides)


def probe_blr(data: str) -> float:
  """The linear probe's base lr: MAE's 0.1, larger on small data sets (docs/evaluation.md)."""
  return {"digits": 25.6, "cifar10": 1.6}.get(data, 0.1)


DURATION_UNITS = ("steps", "epochs", "examples")


def steps(block, name: str, *, steps_per_epoch: int, batch_size: int) -> float:
  """The duration `<name>_steps`, `<name>_epochs` or `<name>_examples` of a config block, in steps
  (a float: fractional warmups stay exact); 0 when none is set. Setting two is an error."""
  given = {unit: block.get(f"{name}_{unit}", 0) for unit in DURATION_UNITS}
  given = {unit: value for unit, value in given.items() if value}
  if len(given) > 1:
    raise ValueError(f"config {name}_{'/'.join(given)}: set only one of them")
  if not given:
    return 0.0
  unit, value = next(iter(given.items()))
  if value < 0:
    raise ValueError(f"config {name}_{unit}: must be >= 0, got {value}")
  return float({"steps": value, "epochs": value * steps_per_epoch,
                "examples": value / batch_size}[unit])


def every_steps(block, name: str, *, steps_per_epoch: int, batch_size: int) -> int:
  """A period (`every_epochs`, `log_every_steps`, ...) in whole steps, at least 1; 0 = never."""
  value = steps(block, name, steps_per_epoch=steps_per_epoch, batch_size=batch_size)
  return max(int(round(value)), 1) if value else 0


def evaluation_config(arg, *, views, global_pool: str) -> ml_collections.ConfigDict:
  """What the linear probe's and fine-tuning's configs start from. Arg keys: data, img, patch,
  model (the architecture of a weights file; a pretraining workdir brings its own)."""
  args = parse_arg(arg, data="digits", model="", img=0, patch=0)
  img, patch, model = default_model_args(args)
  config = ml_collections.ConfigDict()
  config.init_from = ""  # pretraining workdir (latest checkpoint) or weights file
  # 'token': CLS after the final norm; 'avg': mean patch token -> fc_norm
  config.global_pool = global_pool
  config.model = model_config(model, img, patch)
  config.data = data_config(args.data, img, views)
  config.arg = args
  return config


def pretrain_config(arg, *, method: str, views=("mae",), **arg_defaults) -> ml_collections.ConfigDict:
  """Base pretraining config. Arg keys: model, data, img, patch (0 = dataset default), + the caller's."""
  args = parse_arg(arg, model="", data="digits", img=0, patch=0, **arg_defaults)
  on_digits = args.data == "digits"
  img, patch, model = default_model_args(args)

  config = ml_collections.ConfigDict()
  config.method = method
  config.model = model_config(model, img, patch)
  config.decoder = ml_collections.ConfigDict(dict(
      embed_dim=128 if on_digits else 512, depth=2 if on_digits else 8,
      num_heads=4 if on_digits else 16, mask_token_mode="shared"))
  config.data = data_config(args.data, img, views)

  config.batch_size = 128 if on_digits else 4096  # effective global batch (all hosts, all micro-steps)
  config.epochs = 60 if on_digits else 800
  config.warmup_epochs = 5.0 if on_digits else 40.0
  config.blr = 1.5e-3 if on_digits else 1.5e-4
  config.lr = 0.0        # absolute peak lr; 0 = blr * batch_size / 256
  config.min_lr = 0.0
  config.optim = optim_config()
  add_run_keys(config, checkpoint_every=dict(every_steps=200 if on_digits else 1000),
               log_every_steps=20 if on_digits else 100,
               picture_every_steps=200 if on_digits else 5000)
  config.init_from = ""    # workdir or weights file whose encoder initializes this run
  # Evaluations during training (sjmae_jax/evaluation: 'knn', 'classification',
  # 'fast_linear_probe'), each every `every_epochs` (0 = off) and at the end of the schedule.
  config.monitors = ml_collections.ConfigDict(dict(
      knn=knn_monitor(20 if on_digits else 50),
      # The fast linear probe of docs/evaluation.md on the training encoder (off by default).
      fast_probe=dict(type="fast_linear_probe", every_epochs=0, epochs=90, warmup_epochs=10.0,
                      blr=probe_blr(args.data), batch_size=256, num_train=10_000,
                      num_eval=10_000),
  ))
  config.arg = args  # what get_config was called with, for the record
  return config


NONFINITE_POLICIES = ("stop", "skip")
COMPUTE_DTYPES = ("float32", "bfloat16")
SHARDING_STRATEGIES = ("fsdp", "replicate")


def validate(config, num_devices: int | None = None) -> None:
  """Impossible values fail here, before anything is compiled or written, with one line naming
  the key. The engine's keys for every program; the model / data blocks for pretraining configs
  (those with a `method`). `num_devices` (the devices of the data x fsdp mesh) enables the mesh
  and batch checks."""
  if "method" in config:
    _validate_model_and_data(config)
  if config.batch_size <= 0 or config.grad_accum_steps <= 0:
    raise ValueError(f"config batch_size/grad_accum_steps: must be positive, got "
                     f"{config.batch_size}/{config.grad_accum_steps}")
  if config.epochs <= 0:
    raise ValueError(f"config epochs: must be positive, got {config.epochs}")
  for key in ("blr", "lr", "min_lr", "stop_at_step", "stop_after_minutes", "picture_every_steps",
              "log_every_steps", "train_minutes"):
    if config.get(key, 0) < 0:
      raise ValueError(f"config {key}: must be >= 0, got {config[key]}")
  for block, name in ((config, "warmup"), (config, "log_every"), (config.checkpoint, "every")):
    steps(block, name, steps_per_epoch=1, batch_size=1)  # one unit at most, none negative
  if not steps(config.checkpoint, "every", steps_per_epoch=1, batch_size=1):
    raise ValueError("config checkpoint.every_steps: must be >= 1 (or set checkpoint.every_epochs)")
  if not steps(config, "log_every", steps_per_epoch=1, batch_size=1):
    raise ValueError("config log_every_steps: must be >= 1")
  if not 0.0 <= config.get("budget_warmup_fraction", 0.0) < 1.0:
    raise ValueError(f"config budget_warmup_fraction: {config.budget_warmup_fraction} must be in "
                     "[0, 1)")
  if config.checkpoint.keep < 1:
    raise ValueError(f"config checkpoint.keep: must be >= 1, got {config.checkpoint.keep}")
  _validate_optim(config.optim)
  if config.compute_dtype not in COMPUTE_DTYPES:
    raise ValueError(f"config compute_dtype: {config.compute_dtype!r} is not one of "
                     f"{list(COMPUTE_DTYPES)}")
  if config.get("nonfinite", "stop") not in NONFINITE_POLICIES:
    raise ValueError(f"config nonfinite: {config.nonfinite!r} is not one of "
                     f"{list(NONFINITE_POLICIES)}")
  if config.get("debug") and config.debug.get("poison_step", 0) < 0:
    raise ValueError(f"config debug.poison_step: must be >= 0, got {config.debug.poison_step}")
  for name, monitor in config.get("monitors", {}).items():
    steps(monitor, "every", steps_per_epoch=1, batch_size=1)
    if "type" not in monitor:
      raise ValueError(f"config monitors.{name}: has no type")
  _validate_sharding(config.sharding)
  if num_devices is not None:
    _validate_mesh_and_batch(config, num_devices)


def _validate_model_and_data(config) -> None:
  """What the objective's own checks (objectives.check: encoder, decoder, method block) do not
  see: the data block against the model."""
  if config.model.img_size != config.data.img_size:
    raise ValueError(f"config data.img_size: {config.data.img_size} differs from model.img_size "
                     f"{config.model.img_size}")
  _validate_views(config.data)


OPTIMIZERS = ("adamw", "lars")


def _validate_optim(optim) -> None:
  if optim.name not in OPTIMIZERS:
    raise ValueError(f"config optim.name: {optim.name!r} is not one of {list(OPTIMIZERS)}")
  if not (0.0 <= optim.b1 < 1.0 and 0.0 <= optim.b2 < 1.0):
    raise ValueError(f"config optim.b1/b2: must be in [0, 1), got {optim.b1}/{optim.b2}")
  if optim.eps <= 0 or optim.weight_decay < 0 or optim.clip_grad_norm < 0:
    raise ValueError(f"config optim: eps must be > 0, weight_decay and clip_grad_norm >= 0 (got "
                     f"{optim.eps}, {optim.weight_decay}, {optim.clip_grad_norm})")
  if not 0.0 < optim.layer_decay <= 1.0:
    raise ValueError(f"config optim.layer_decay: {optim.layer_decay} must be in (0, 1]")
  if optim.get("flatten", False) not in (False, True):
    raise ValueError(f"config optim.flatten: {optim.flatten!r} must be True or False")
  for key in ("lr_mults", "wd_mults"):
    _validate_regex_rules(f"optim.{key}", optim[key], "multiplier >= 0",
                          lambda value: isinstance(value, (int, float)) and value >= 0)


def _validate_views(data_config) -> None:
  views = list(data_config.views)
  if not views:
    raise ValueError("config data.views: empty (expected recipe names, e.g. ['simclr', 'simclr'])")
  unknown = [view for view in views if view not in data_config.recipes]
  if unknown:
    raise ValueError(f"config data.views: unknown recipe(s) {unknown} (data.recipes: "
                     f"{sorted(data_config.recipes)})")


def _validate_regex_rules(key: str, rules, what: str, valid) -> None:
  """(regex, value) pairs: each a pair, a valid regex and a valid value."""
  for rule in rules:
    if len(rule) != 2 or not valid(rule[1]):
      raise ValueError(f"config {key}: {tuple(rule)} is not a (regex, {what}) pair")
    try:
      re.compile(rule[0])
    except re.error as e:
      raise ValueError(f"config {key}: bad regex {rule[0]!r}: {e}") from None


def _validate_sharding(sharding_config) -> None:
  _validate_regex_rules("sharding.rules", sharding_config.rules,
                        " | ".join(SHARDING_STRATEGIES), lambda value: value in SHARDING_STRATEGIES)
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
