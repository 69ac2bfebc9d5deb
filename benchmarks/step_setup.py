"""The setups that train_step.py measures: the fast-path levers (Setup), the config of a case
(configs/<method>.py with a setup's levers and --override), the lever rows switched from a base
setup, and the best combination of the levers that won."""
import dataclasses
import importlib.util
import os

from sjmae_jax import config_lib
from sjmae_jax.models.sizes import SIZES
from sjmae_jax.models.vit import vit_kwargs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The model levers: config.model key -> its fast value (the default is the plain form).
MODEL_LEVERS = {"norm_impl": "fused", "gelu_impl": "fused", "gelu_approximate": True,
                "gather_impl": "permute", "cast_params_once": True, "qkv_impl": "split"}
# --fast: the model levers measured together on one H200 on 2026-12-04 (docs/performance.md).
FAST_LEVERS = ("norm_impl", "gelu_impl", "gather_impl", "cast_params_once")
# Levers that give a model key another value than its MODEL_LEVERS one: name -> (key, value).
VALUE_LEVERS = {"norm_pallas": ("norm_impl", "pallas"), "gelu_pallas": ("gelu_impl", "pallas")}
LEVERS = ("dtype", "attention", "remat", "donate", "batch_passes", *MODEL_LEVERS, *VALUE_LEVERS,
          "optim_flatten", "xla_flags", "batch")
REMAT_POLICY_LEVER = "dots_with_no_batch_dims_saveable"
# XLA GPU flags measured one set at a time by the xla_flags lever (--xla-flag-sets overrides).
XLA_FLAG_SETS = ("--xla_gpu_enable_triton_gemm=false", "--xla_gpu_enable_cublaslt=true",
                 "--xla_gpu_autotune_level=0")
# Levers that --best may combine: they change how the step runs, not what it computes.
COMBINABLE = ("attention", "remat", "batch_passes", *(k for k in MODEL_LEVERS
                                                      if k != "gelu_approximate"),
              "optim_flatten", "xla_flags")
BEST_GAIN = 1.02


@dataclasses.dataclass(frozen=True)
class Setup:
  """The fast-path levers of one measurement."""
  dtype: str = "bfloat16"
  attention: str = "auto"   # model.attention_impl: auto (cuDNN on GPU) | xla | cudnn
  remat: str = ""           # '' off, 'full' (save block inputs only), or a checkpoint policy
  donate: bool = True       # donate the train state to the step (as train.py)
  batch_passes: bool = True  # SJ-MAE: both encoder passes in one call
  norm_impl: str = "flax"   # model.norm_impl
  gelu_impl: str = "flax"   # model.gelu_impl
  gelu_approximate: bool = False  # model.gelu_approximate
  gather_impl: str = "take"  # model.gather_impl
  cast_params_once: bool = False  # model.cast_params_once
  qkv_impl: str = "fused"   # model.qkv_impl
  optim_flatten: bool = False  # optim.flatten
  xla_flags: str = ""       # XLA_FLAGS of its own (the measurement runs in a new process)
  batch_scale: int = 1      # the global batch is --batch times this

  def tags(self, method: str) -> list:
    """How this setup differs from the fast path (FAST_PATH), as 'lever=value' strings."""
    tags = []
    for field in dataclasses.fields(self):
      if field.name == "batch_passes" and method != "sjmae":
        continue
      value = getattr(self, field.name)
      if value != getattr(FAST_PATH, field.name):
        tags.append(lever_tag(field.name, value))
    return tags


def lever_tag(name: str, value) -> str:
  """'norm_impl=fused', 'donate=off', 'batch x2': how a row names a lever's value."""
  if name == "batch_scale":
    return f"batch x{value}"
  shown = ("on" if value else "off") if isinstance(value, bool) else (value or "off")
  return f"{name}={shown}"


FAST_PATH = Setup()


def load_method_config(method: str, arg: str):
  spec = importlib.util.spec_from_file_location(f"config_{method}",
                                                os.path.join(REPO, "configs", f"{method}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def set_config_value(config, key: str, text: str):
  """--override key=value: the value is parsed as the type of the key's current value."""
  node = config
  *parents, leaf = key.split(".")
  for parent in parents:
    node = node[parent]
  if leaf not in node:
    raise ValueError(f"--override {key}: no such config key")
  current = node[leaf]
  if isinstance(current, bool):
    value = text.lower() in ("1", "true", "yes", "on")
  elif isinstance(current, (int, float, str)):
    value = type(current)(text)
  else:
    raise ValueError(f"--override {key}: a {type(current).__name__} cannot be set from the "
                     "command line")
  node[leaf] = value


def build_config(method: str, model: str, args, setup: Setup):
  """configs/<method>.py for `model` at args.img (data=cifar10: only the e2e runs read data; any
  dataset other than the digits demo gives the 512 x 8 decoder), then the setup's levers."""
  arg = f"model={model},data=cifar10,img={args.img}"
  if args.patch:
    arg += f",patch={args.patch}"
  config = load_method_config(method, arg)
  config.batch_size = args.batch * setup.batch_scale
  for item in args.override:
    key, _, value = item.partition("=")
    set_config_value(config, key, value)
  config.compute_dtype = setup.dtype
  config.model.attention_impl = setup.attention
  config.model.remat = bool(setup.remat)
  if setup.remat not in ("", "full"):
    config.model.remat_policy = setup.remat
  for key in MODEL_LEVERS:
    config.model[key] = getattr(setup, key)
  config.optim.flatten = setup.optim_flatten
  if method == "sjmae":
    config.sjmae.batch_passes = setup.batch_passes
  return config


def setup_argv(setup: Setup) -> list:
  """The command-line options of this script that give `setup` (for a child process)."""
  argv = ["--dtype", setup.dtype, "--attention", setup.attention, f"--remat={setup.remat}",
          "--norm-impl", setup.norm_impl, "--gelu-impl", setup.gelu_impl,
          "--gather-impl", setup.gather_impl, "--qkv-impl", setup.qkv_impl]
  argv += ["--optim-flatten"] * setup.optim_flatten
  argv += ["--no-donate"] * (not setup.donate) + ["--no-batch-passes"] * (not setup.batch_passes)
  argv += ["--gelu-approximate"] * setup.gelu_approximate
  argv += ["--cast-params-once"] * setup.cast_params_once
  return argv


def model_label(config, model: str) -> str:
  """'vit_base_patch16' for the standard sizes with MAE's 512 x 8 decoder; sizes spelled out
  otherwise."""
  encoder = vit_kwargs(config.model)
  sizes = (encoder["embed_dim"], encoder["depth"], encoder["num_heads"])
  decoder = (config.decoder.embed_dim, config.decoder.depth, config.decoder.num_heads)
  variant = config_lib.MODELS.get(model, ("custom",))[0]
  if variant in SIZES and SIZES[variant][:3] == sizes and decoder == (512, 8, 16):
    return f"{model}_patch{encoder['patch_size']}"
  return (f"vit_{sizes[0]}x{sizes[1]}_dec{decoder[0]}x{decoder[1]}"
          f"_patch{encoder['patch_size']}")


def lever_setups(base: Setup, method: str, names: list, platform_name: str,
                 flag_sets=XLA_FLAG_SETS):
  """[(setup, None) or (None, why skipped)] with each named lever switched from `base`."""
  variants = []
  for name in names:
    if name == "dtype":
      other = "float32" if base.dtype == "bfloat16" else "bfloat16"
      variants.append((dataclasses.replace(base, dtype=other), None))
    elif name == "attention":
      if base.attention in ("auto", "cudnn"):
        if platform_name != "gpu":
          variants.append((None, f"attention: auto is XLA's on {platform_name}; cuDNN needs a "
                                 "CUDA GPU"))
        else:
          variants.append((dataclasses.replace(base, attention="xla"), None))
      elif platform_name == "gpu":
        variants.append((dataclasses.replace(base, attention="cudnn"), None))
      else:
        variants.append((None, f"attention=cudnn: needs a CUDA GPU (this is {platform_name})"))
    elif name == "remat":
      if base.remat:
        variants.append((dataclasses.replace(base, remat=""), None))
      else:
        variants.append((dataclasses.replace(base, remat="full"), None))
        variants.append((dataclasses.replace(base, remat=REMAT_POLICY_LEVER), None))
    elif name == "donate":
      variants.append((dataclasses.replace(base, donate=not base.donate), None))
    elif name == "batch_passes":
      if method == "sjmae":
        variants.append((dataclasses.replace(base, batch_passes=not base.batch_passes), None))
    elif name in MODEL_LEVERS:
      plain = getattr(Setup(), name)
      value = MODEL_LEVERS[name] if getattr(base, name) == plain else plain
      variants.append((dataclasses.replace(base, **{name: value}), None))
    elif name in VALUE_LEVERS:
      key, value = VALUE_LEVERS[name]
      value = value if getattr(base, key) != value else getattr(Setup(), key)
      variants.append((dataclasses.replace(base, **{key: value}), None))
    elif name == "optim_flatten":
      variants.append((dataclasses.replace(base, optim_flatten=not base.optim_flatten), None))
    elif name == "xla_flags":
      for flags in flag_sets:
        variants.append((dataclasses.replace(base, xla_flags=flags), None))
    elif name == "batch":
      variants.append((dataclasses.replace(base, batch_scale=2 * base.batch_scale), None))
  return variants


def best_setup(base: Setup, base_rate: float, lever_results: list):
  """`base` with every combinable lever whose row ran >= BEST_GAIN x base_rate (the fastest
  value of each lever; the flag sets that won, together); and the winning tags."""
  best = {}
  for setup, rate in lever_results:
    if not rate or rate < BEST_GAIN * base_rate:
      continue
    for field in COMBINABLE:
      value = getattr(setup, field)
      if value == getattr(base, field):
        continue
      if field == "xla_flags":
        best.setdefault("xla_flags", []).append(value)
      elif field not in best or rate > best[field][1]:
        best[field] = (value, rate)
  changes = {field: (" ".join(value) if field == "xla_flags" else value[0])
             for field, value in best.items()}
  combined = dataclasses.replace(base, **changes)
  won = [lever_tag(field.name, getattr(combined, field.name))
         for field in dataclasses.fields(Setup) if field.name in changes]
  return combined, won
