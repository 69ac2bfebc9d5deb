"""Fit a k-means visual tokenizer on a teacher's patch features (MaPeT's token targets).

  python -m sjmae_jax.tokenizers.fit_kmeans --teacher TEACHER --config configs/mapet.py[:arg] \
      --out tokenizers/NAME.npy [--codebook_size K] [--num_images N] [--iterations 20] \
      [--init random|kmeans++] [--config.key=value ...]

TEACHER: a sjmae_jax workdir (latest checkpoint), a ViT weights file (timm / MAE .safetensors,
.pth, .bin) or a timm CLIP image tower (`vit_*_clip_*` state dict; with it this is MaPeT's k-CLIP
tokenizer). The config gives the data (its train split, eval crop, its normalisation) and the
student's patch grid; the codebook size defaults to config.mapet.codebook_size. Writes OUT.npy
(the codebook), OUT.json and OUT.teacher.safetensors (see sjmae_jax/tokenizers/tokenizer.py);
train with --config.mapet.target=tokens --config.mapet.tokenizer=OUT.npy
"""
import sys
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from sjmae_jax.data.config import data_normalization

_CONFIG = config_flags.DEFINE_config_file("config", None,
                                          "Config file (path[:arg]) of the student.",
                                          lock_config=True)
_TEACHER = flags.DEFINE_string("teacher", None, "Teacher: a workdir or a ViT weights file.")
_OUT = flags.DEFINE_string("out", None, "Output codebook path (.npy); .json and "
                           ".teacher.safetensors are written beside it.")
_CODEBOOK_SIZE = flags.DEFINE_integer("codebook_size", 0,
                                      "Centroids (0 = config.mapet.codebook_size).")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 10_000,
                                   "Train-split images to take features from.")
_MAX_POINTS = flags.DEFINE_integer("max_points_per_centroid", 512,
                                   "Patch features kept at most per centroid, sampled at random "
                                   "(faiss' default, as the original).")
_ITERATIONS = flags.DEFINE_integer("iterations", 20, "Lloyd iterations.")
_INIT = flags.DEFINE_enum("init", "random", ["random", "kmeans++"], "Centroid initialisation.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the initialisation and the point sampling.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 256, "Images per teacher forward pass.")
_TEACHER_NUM_HEADS = flags.DEFINE_integer("teacher_num_heads", 0,
                                          "Heads of a teacher weights file of non-standard width.")
_TEACHER_NORMALIZE = flags.DEFINE_enum(
    "teacher_normalize", "auto", ["auto", "data", "imagenet", "clip", "none"],
    "Mean/std the teacher expects: 'data' = what the config's pipeline gives; 'auto' = 'clip' for "
    "CLIP towers, else 'data'.")
_TEACHER_QUICK_GELU = flags.DEFINE_bool("teacher_quick_gelu", True,
                                        "CLIP towers: QuickGELU (OpenAI weights) or exact GELU "
                                        "(LAION weights, --noteacher_quick_gelu).")
flags.mark_flags_as_required(["config", "teacher", "out"])


def collect_features(data_config, teacher_kwargs, teacher_params, *, teacher_norm,
                     num_images: int, batch_size: int) -> np.ndarray:
  """(num_images, L, D) teacher patch features of the first images of the train split."""
  from sjmae_jax import data
  from sjmae_jax.tokenizers.tokenizer import teacher_features
  pipeline = data.build_eval_pipeline(data_config, split=data_config.train_split,
                                      global_batch_size=batch_size)
  features_fn = jax.jit(lambda params, images: teacher_features(
      teacher_kwargs, params, images, data_norm=data_normalization(data_config),
      teacher_norm=teacher_norm))
  collected, count = [], 0
  for batch in pipeline:
    features = np.asarray(features_fn(teacher_params, batch["images"][:, 0]))
    features = features[np.asarray(batch["valid"])]
    collected.append(features[:num_images - count])
    count += len(collected[-1])
    if count >= num_images:
      break
  return np.concatenate(collected)


def fit(config, teacher: str, out: str, *, codebook_size: int = 0, num_images: int = 10_000,
        max_points_per_centroid: int = 512, iterations: int = 20, init: str = "random",
        seed: int = 0, batch_size: int = 256, teacher_num_heads: int = 0,
        teacher_normalize: str = "auto", teacher_quick_gelu: bool = True) -> dict:
  """Fit and save a tokenizer; returns the JSON written beside the codebook."""
  from sjmae_jax.tokenizers import kmeans, tokenizer
  k = codebook_size or config.mapet.codebook_size
  grid = config.model.img_size // config.model.patch_size
  teacher_kwargs, teacher_params = tokenizer.load_teacher(
      teacher, grid=grid, num_heads=teacher_num_heads, quick_gelu=teacher_quick_gelu)
  if teacher_normalize == "auto":
    teacher_normalize = "clip" if teacher_kwargs.get("pre_norm") else "data"
  teacher_norm = (data_normalization(config.data) if teacher_normalize == "data"
                  else tokenizer.NORMALIZATIONS[teacher_normalize])
  started = time.time()
  features = collect_features(config.data, teacher_kwargs, teacher_params,
                              teacher_norm=teacher_norm, num_images=num_images,
                              batch_size=batch_size)
  points = features.reshape(-1, features.shape[-1])
  rng = np.random.default_rng(seed)
  max_points = k * max_points_per_centroid
  if len(points) > max_points:
    points = points[rng.choice(len(points), max_points, replace=False)]
  if len(points) < k:
    raise ValueError(f"--codebook_size {k} is more than the {len(points)} patch features of "
                     f"{len(features)} images; lower it or raise --num_images")
  print(f"k-means: {len(points)} patch features ({len(features)} images, dim {points.shape[1]}) "
        f"-> {k} centroids, {iterations} iterations", flush=True)
  centroids, history = kmeans.kmeans(jax.random.PRNGKey(seed), points, k=k,
                                     iterations=iterations, init=init)
  ids, _ = kmeans.nearest_centroid(points, centroids)
  used = int(np.unique(np.asarray(ids)).size)
  history = [round(float(x), 6) for x in np.asarray(history)]
  print(f"mean squared distance {history[0]:.4f} -> {history[-1]:.4f}; {used}/{k} codes used; "
        f"{time.time() - started:.1f}s", flush=True)
  info = {"feature": "teacher patch tokens after its final norm", "teacher_source": str(teacher),
          "data_source": config.data.source, "split": config.data.train_split,
          "num_images": int(len(features)), "num_points": int(len(points)),
          "iterations": iterations, "init": init, "seed": seed, "codes_used": used,
          "mean_sq_distance": history}
  content = tokenizer.save_tokenizer(out, centroids, teacher_kwargs, teacher_params,
                                     teacher_norm=teacher_norm, info=info)
  print(f"wrote {out}, {tokenizer.json_path(out)}, {tokenizer.teacher_weights_path(out)}",
        flush=True)
  return content


def main(argv):
  del argv
  try:
    fit(_CONFIG.value, _TEACHER.value, _OUT.value, codebook_size=_CODEBOOK_SIZE.value,
        num_images=_NUM_IMAGES.value, max_points_per_centroid=_MAX_POINTS.value,
        iterations=_ITERATIONS.value, init=_INIT.value, seed=_SEED.value,
        batch_size=_BATCH_SIZE.value, teacher_num_heads=_TEACHER_NUM_HEADS.value,
        teacher_normalize=_TEACHER_NORMALIZE.value, teacher_quick_gelu=_TEACHER_QUICK_GELU.value)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
