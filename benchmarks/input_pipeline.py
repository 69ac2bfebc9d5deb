"""Input pipeline throughput (images/s), all cores and per CPU core.

  python benchmarks/input_pipeline.py                      # both cases, all cores
  python benchmarks/input_pipeline.py --cores 1            # pinned to one core
  python benchmarks/input_pipeline.py --case cifar_simclr --split-stages
  python benchmarks/input_pipeline.py --smoke              # seconds, on generated images

Cases:
  cifar_simclr  CIFAR-10 ImageFolder (real JPEGs, $SJMAE_CIFAR10_DIR or --cifar-dir) at 32 px,
                SJ-MAE's views (simclr recipe, two views), decoded uint8 cached in memory (the
                prepared cache is built on the first run, timed separately).
  jpeg224_rrc   A temporary folder of 224 px JPEGs (CIFAR images upsampled), decoded every step,
                RandomResizedCrop + flip (mae recipe) at 224 px.
Each case times the views finished on the host (data.augment_on_device=False); --split-stages
also times the pre-batches alone (data.augment_on_device=True, the default on accelerators:
everything the host still does when the views are computed in the training step).
--smoke runs both cases on a small generated CIFAR-shaped folder (no CIFAR-10 needed).
"""

import argparse
import os
import sys
import tempfile
import time


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--case", choices=["cifar_simclr", "jpeg224_rrc", "all"], default="all")
  parser.add_argument("--cores", type=int, default=0,
                      help="pin the process to this many CPU cores (0: all available)")
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--steps", type=int, default=30, help="timed steps (after warm-up)")
  parser.add_argument("--jpegs", type=int, default=2000, help="224 px JPEGs to generate")
  parser.add_argument("--split-stages", action="store_true")
  parser.add_argument("--smoke", action="store_true",
                      help="a generated 64-image folder, batch 16, 3 steps, --split-stages")
  parser.add_argument("--cifar-dir", default=None,
                      help="CIFAR-10 ImageFolder (default: $SJMAE_CIFAR10_DIR, as configs use)")
  parser.add_argument("--data-dir", default=None,
                      help="where prepared caches go (default: a temporary directory)")
  return parser.parse_args()


def main():
  args = parse_args()
  available = sorted(os.sched_getaffinity(0))
  if args.cores:
    # Before TF / XLA start: their thread pools are sized from the affinity mask.
    os.sched_setaffinity(0, available[:args.cores])
  cores = len(os.sched_getaffinity(0))
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
  # pylint: disable=import-outside-toplevel
  from sjmae_jax import config_lib, data
  # pylint: enable=import-outside-toplevel

  work_dir = tempfile.TemporaryDirectory(prefix="sjmae_bench_")
  data_dir = args.data_dir or work_dir.name
  if args.smoke:
    args.cifar_dir = make_cifar_shaped_folder(os.path.join(work_dir.name, "cifar"), 64)
    args.batch, args.steps, args.jpegs, args.split_stages = 16, 3, 16, True
  args.cifar_dir = args.cifar_dir or config_lib.cifar10_dir()
  print(f"cores: {cores} (of {len(available)}), batch {args.batch}, {args.steps} timed steps, "
        f"{'TensorFlow loaded' if 'tensorflow' in sys.modules else 'no TensorFlow'}")

  def measure(cfg, label):
    start = time.perf_counter()
    train = data.build_train_pipeline(cfg, global_batch_size=args.batch, seed=0,
                                      process_index=0, process_count=1)
    build = time.perf_counter() - start
    for _ in range(3):  # warm-up: Grain threads start, jit compile
      next(train)
    start = time.perf_counter()
    for _ in range(args.steps):
      batch = next(train)
    seconds = time.perf_counter() - start
    rate = args.steps * args.batch / seconds
    shapes = {key: value.shape for key, value in batch.items()}
    print(f"{label:<44} {rate:9.0f} images/s  {rate / cores:8.0f} images/s/core  "
          f"(build {build:.1f} s) {shapes}")
    return rate

  if args.case in ("cifar_simclr", "all"):
    if not os.path.isdir(args.cifar_dir):
      sys.exit(f"CIFAR-10 folder not found: {args.cifar_dir} (set --cifar-dir)")
    cfg = data.default_config()
    cfg.source = f"folder:{os.path.abspath(args.cifar_dir)}"
    cfg.data_dir = data_dir
    cfg.img_size = 32
    cfg.views = ["simclr", "simclr"]
    start = time.perf_counter()
    info = data.dataset_info(cfg)
    data.build_eval_pipeline(cfg, split="train", global_batch_size=args.batch, process_index=0,
                             process_count=1)  # prepares the decoded cache of the train split
    print(f"prepare CIFAR-10 train ({info.num_examples('train')} JPEGs -> uint8 cache): "
          f"{time.perf_counter() - start:.1f} s")
    cfg.augment_on_device = False
    measure(cfg, "(a) CIFAR-10 32px simclr x2, host")
    if args.split_stages:
      cfg.augment_on_device = True
      measure(cfg, "(a) same, pre-batches only (augment_on_device)")

  if args.case in ("jpeg224_rrc", "all"):
    root = os.path.join(work_dir.name, "jpeg224")
    start = time.perf_counter()
    count = make_jpeg_folder(args.cifar_dir, root, args.jpegs)
    print(f"wrote {count} 224 px JPEGs in {time.perf_counter() - start:.1f} s")
    cfg = data.default_config()
    cfg.source = f"folder:{root}"
    cfg.data_dir = data_dir
    cfg.img_size = 224
    cfg.views = ["mae"]
    cfg.cache = False  # decode every step
    cfg.augment_on_device = False
    measure(cfg, "(b) 224px JPEG decode + RRC + flip, host")
    if args.split_stages:
      cfg.augment_on_device = True
      measure(cfg, "(b) same, pre-batches only (augment_on_device)")
  work_dir.cleanup()


def make_cifar_shaped_folder(root, count):
  """ROOT/{train,test}/<class>/*.jpg: `count` (train) and count / 4 (test) random 32 px JPEGs in
  4 classes (for --smoke)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  for split, split_count in (("train", count), ("test", count // 4)):
    for index in range(split_count):
      class_dir = os.path.join(root, split, f"class{index % 4}")
      os.makedirs(class_dir, exist_ok=True)
      Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
          os.path.join(class_dir, f"{index}.jpg"), quality=90)
  return root


def make_jpeg_folder(cifar_dir, root, count):
  """ImageFolder of `count` 224 px JPEGs: CIFAR-10 train images upsampled (bicubic)."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  train_dir = os.path.join(cifar_dir, "train")
  classes = sorted(os.listdir(train_dir))
  per_class = max(1, count // len(classes))
  written = 0
  for class_name in classes:
    os.makedirs(os.path.join(root, "train", class_name))
    names = sorted(os.listdir(os.path.join(train_dir, class_name)))[:per_class]
    for name in names:
      with Image.open(os.path.join(train_dir, class_name, name)) as image:
        big = image.convert("RGB").resize((224, 224), Image.BICUBIC)
      big.save(os.path.join(root, "train", class_name, os.path.splitext(name)[0] + ".jpg"),
               quality=90)
      written += 1
  return written


if __name__ == "__main__":
  main()
