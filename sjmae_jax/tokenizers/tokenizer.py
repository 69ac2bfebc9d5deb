"""A visual tokenizer: a frozen teacher ViT and a k-means codebook over its patch features.

The id of a patch is the nearest codebook entry to the teacher's output token for that patch
(after the teacher's final norm). `fit_kmeans` writes a tokenizer as three files:
  OUT.npy                    codebook (K, D) float32
  OUT.json                   codebook size, feature dim, the teacher's architecture and input
                             normalisation, how the codebook was fit
  OUT.teacher.safetensors    the teacher (timm key names), at the patch grid it serves
so a tokenizer is self-contained: the MaPeT objective needs only OUT.npy's path.

Teachers: a sjmae_jax pretraining workdir (its latest checkpoint's encoder), a ViT weights file
that `interop.load_pretrained` reads (timm / MAE .safetensors, .pth, .bin), or a timm CLIP image
tower (`vit_*_clip_*`, recognised by its `norm_pre`). Every teacher is a models.vit
VisionTransformer; a CLIP tower is one with CLIP's switches (`CLIP_TOWER`: a LayerNorm before
the blocks, no patch-embedding bias, LayerNorm eps 1e-5, and QuickGELU for OpenAI's weights,
exact GELU for LAION's). The teacher always yields one token per patch of the student: its input
size is the student's patch grid times the teacher's own patch size (images are resized to it,
the position embedding is resampled), and images are re-normalised from the data's mean/std to
the teacher's.
"""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from sjmae_jax import checkpointing, interop
from sjmae_jax.data.config import IMAGENET_MEAN, IMAGENET_STD
from sjmae_jax.interop import timm as timm_interop
from sjmae_jax.interop.convert import params_to_state_dict, state_dict_to_params, to_numpy
from sjmae_jax.models.sizes import SIZES
from sjmae_jax.models.vit import VisionTransformer, vit_kwargs

# embed_dim -> num_heads of the standard ViT sizes, for weights files (heads are not in them).
STANDARD_NUM_HEADS = {size.embed_dim: size.num_heads for size in SIZES.values()}
# The VisionTransformer switches of a timm CLIP image tower (timm builds them with pre_norm=True,
# which also drops the patch bias, and norm_layer=LayerNorm(eps=1e-5)); act_layer is
# 'quick_gelu' for OpenAI's weights, 'gelu' for LAION's.
CLIP_TOWER = dict(pre_norm=True, patch_bias=False, norm_eps=1e-5)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
NORMALIZATIONS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD),
                  "clip": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
                  "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))}


def teacher_module(teacher_kwargs: dict, dtype=jnp.float32):
  """The unbound VisionTransformer described by a tokenizer's 'teacher' entry."""
  kwargs = dict(teacher_kwargs)
  if kwargs.pop("architecture", "vit") == "clip":  # a tokenizer written before the one ViT
    kwargs.update(CLIP_TOWER, act_layer="quick_gelu" if kwargs.pop("quick_gelu") else "gelu")
  return VisionTransformer(**kwargs, dtype=dtype, parent=None)


def _vit_kwargs_from_params(encoder, *, grid: int, num_heads: int) -> dict:
  patch_size, _, in_chans, embed_dim = encoder["patch_embed"]["proj"]["kernel"].shape
  hidden = encoder["blocks_0"]["mlp"]["fc1"]["kernel"].shape[1]
  return dict(img_size=grid * int(patch_size), patch_size=int(patch_size),
              in_chans=int(in_chans), embed_dim=int(embed_dim),
              depth=sum(name.startswith("blocks_") for name in encoder), num_heads=int(num_heads),
              mlp_ratio=hidden / embed_dim,
              # the value is only an initializer; the loaded gammas replace it
              layer_scale_init=1.0 if "ls1" in encoder["blocks_0"] else None,
              final_norm="norm" in encoder)


def _heads(embed_dim: int, num_heads: int, source) -> int:
  num_heads = num_heads or STANDARD_NUM_HEADS.get(embed_dim, 0)
  if not num_heads:
    raise ValueError(f"teacher {source}: embed_dim {embed_dim} is not a standard ViT width; "
                     "give its number of heads (--teacher_num_heads)")
  return num_heads


def _clip_teacher(state_dict, *, grid: int, num_heads: int, quick_gelu: bool, source):
  """A timm CLIP image tower (keys of timm's VisionTransformer(pre_norm=True)) ->
  (kwargs, params)."""
  tower = {key: value for key, value in state_dict.items()
           if not key.startswith(timm_interop.CLASSIFIER_PREFIXES)}  # drop the projection head
  tower["pos_embed"] = interop.resample_pos_embed(to_numpy(tower["pos_embed"]), grid)
  params = state_dict_to_params(tower)
  embed_dim = int(params["cls_token"].shape[-1])
  kwargs = _vit_kwargs_from_params(params, grid=grid,
                                   num_heads=_heads(embed_dim, num_heads, source))
  kwargs.update(CLIP_TOWER, act_layer="quick_gelu" if quick_gelu else "gelu")
  return kwargs, params


def load_teacher(source, *, grid: int, num_heads: int = 0, quick_gelu: bool = True):
  """(teacher kwargs, params as float32 numpy) from a workdir or a weights file.

  grid: the student's patch grid side; the teacher is set up to give grid x grid patch tokens.
  num_heads: needed for a weights file of a non-standard width (0 = from the standard sizes).
  quick_gelu: for CLIP towers only (True for OpenAI's weights, False for LAION's).
  """
  source = epath.Path(source)
  if source.is_dir():
    params, config = checkpointing.load_params(source)
    encoder = {name: value for name, value in params["encoder"].items() if name != "mask_token"}
    pos_embed = np.asarray(encoder["pos_embed"])
    if timm_interop.grid_of(pos_embed.shape) != grid:
      encoder = dict(encoder, pos_embed=interop.resample_pos_embed(pos_embed, grid))
    kwargs = _vit_kwargs_from_params(encoder, grid=grid,
                                     num_heads=num_heads or vit_kwargs(config.model)["num_heads"])
  else:
    state_dict = interop.read_state_dict(str(source))
    if "patch_embed.proj.weight" not in state_dict:
      raise ValueError(f"teacher {source}: no 'patch_embed.proj.weight'; not a ViT weights file")
    if "norm_pre.weight" in state_dict:
      kwargs, encoder = _clip_teacher(state_dict, grid=grid, num_heads=num_heads,
                                      quick_gelu=quick_gelu, source=source)
    else:
      patch_size = int(state_dict["patch_embed.proj.weight"].shape[-1])
      encoder = interop.load_pretrained(str(source), img_size=grid * patch_size,
                                        patch_size=patch_size)["encoder"]
      embed_dim = int(encoder["cls_token"].shape[-1])
      kwargs = _vit_kwargs_from_params(encoder, grid=grid,
                                       num_heads=_heads(embed_dim, num_heads, source))
  return kwargs, jax.tree.map(lambda x: np.asarray(x, np.float32), encoder)


def teacher_features(teacher_kwargs: dict, params, images, *, data_norm, teacher_norm,
                     dtype=jnp.float32):
  """Patch tokens (B, L, D) of the teacher after its final norm (if it has one).

  images: (B, H, W, C) as the student sees them, normalised with data_norm = (mean, std); they
  are re-normalised to teacher_norm and resized (bicubic) to the teacher's input size.
  """
  if tuple(map(tuple, data_norm)) != tuple(map(tuple, teacher_norm)):
    raw = images * jnp.asarray(data_norm[1]) + jnp.asarray(data_norm[0])  # back to [0, 1]
    images = (raw - jnp.asarray(teacher_norm[0])) / jnp.asarray(teacher_norm[1])
  size = teacher_kwargs["img_size"]
  if images.shape[1] != size or images.shape[2] != size:
    images = jax.image.resize(images, (images.shape[0], size, size, images.shape[3]), "bicubic")
  teacher = teacher_module(teacher_kwargs, dtype)
  return teacher.apply({"params": params}, images, train=False)[:, 1:]


@dataclasses.dataclass(frozen=True)
class Tokenizer:
  """A tokenizer on disk (see the module docstring). Reading its arrays is numpy only."""
  codebook_path: str
  teacher_path: str
  teacher_kwargs: dict
  teacher_norm: tuple  # (mean, std) the teacher's input is normalised with
  codebook_size: int
  feature_dim: int

  def param_shapes(self) -> dict:
    """Shapes of {'encoder': teacher params, 'codebook': (K, D)}, computed without reading."""
    kw = self.teacher_kwargs
    images = jnp.zeros((1, kw["img_size"], kw["img_size"], kw["in_chans"]), jnp.float32)
    encoder = jax.eval_shape(teacher_module(kw).init, jax.random.PRNGKey(0), images)["params"]
    return {"encoder": encoder,
            "codebook": jax.ShapeDtypeStruct((self.codebook_size, self.feature_dim), jnp.float32)}

  def load_arrays(self) -> dict:
    """{'encoder', 'codebook'} as float32 numpy arrays with exactly `param_shapes()`."""
    arrays = {"encoder": state_dict_to_params(interop.read_state_dict(self.teacher_path)),
              "codebook": _load_npy(self.codebook_path).astype(np.float32)}
    expected = jax.tree.map(lambda s: tuple(s.shape), self.param_shapes())
    found = jax.tree.map(lambda x: tuple(x.shape), arrays)
    if expected != found:
      raise ValueError(f"tokenizer {self.codebook_path}: its files do not match its JSON "
                       f"(expected shapes {expected}, found {found})")
    return arrays


def _load_npy(path) -> np.ndarray:
  with epath.Path(path).open("rb") as f:
    return np.load(f)


def _absolute(path) -> epath.Path:
  """Local paths made absolute (they are stored in configs); gs:// and the like as they are."""
  path = epath.Path(path)
  return path if "://" in os.fspath(path) else path.absolute()


def json_path(codebook_path) -> str:
  return os.fspath(epath.Path(codebook_path).with_suffix(".json"))


def teacher_weights_path(codebook_path) -> str:
  return os.fspath(epath.Path(codebook_path).with_suffix(".teacher.safetensors"))


def save_tokenizer(codebook_path, codebook, teacher_kwargs: dict, teacher_params, *,
                   teacher_norm, info: dict | None = None) -> dict:
  """Write OUT.npy, OUT.json and OUT.teacher.safetensors; returns the JSON content."""
  codebook = np.asarray(codebook, np.float32)
  codebook_path = os.fspath(codebook_path)
  if not codebook_path.endswith(".npy"):
    raise ValueError(f"tokenizer output {codebook_path!r}: expected a .npy path")
  epath.Path(codebook_path).parent.mkdir(parents=True, exist_ok=True)
  with epath.Path(codebook_path).open("wb") as f:
    np.save(f, codebook)
  weights_path = teacher_weights_path(codebook_path)
  interop.save_state_dict(params_to_state_dict(teacher_params), weights_path)
  mean, std = teacher_norm
  content = {"codebook_size": int(codebook.shape[0]), "feature_dim": int(codebook.shape[1]),
             "teacher": dict(teacher_kwargs), "teacher_weights": epath.Path(weights_path).name,
             "teacher_mean": list(mean), "teacher_std": list(std), **(info or {})}
  epath.Path(json_path(codebook_path)).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
  return content


def read_tokenizer(codebook_path) -> Tokenizer:
  """The tokenizer whose codebook is `codebook_path` (reads only its JSON)."""
  path = epath.Path(json_path(codebook_path))
  if not path.exists():
    raise FileNotFoundError(f"tokenizer {codebook_path}: no {path}; write tokenizers with "
                            "python -m sjmae_jax.tokenizers.fit_kmeans")
  content = json.loads(path.read_text())
  return Tokenizer(codebook_path=os.fspath(_absolute(codebook_path)),
                   teacher_path=os.fspath(_absolute(path).parent / content["teacher_weights"]),
                   teacher_kwargs=dict(content["teacher"]),
                   teacher_norm=(tuple(content["teacher_mean"]), tuple(content["teacher_std"])),
                   codebook_size=int(content["codebook_size"]),
                   feature_dim=int(content["feature_dim"]))
