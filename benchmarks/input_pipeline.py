"""Input pipeline throughput (images/s), all cores and per CPU core.

  python benchmarks/input_pipeline.py                      # every case, all cores
  python benchmarks/input_pipeline.py --cores 1            # pinned to one core
  python benchmarks/input_pipeline.py --case cifar_simclr --split-stages
  python benchmarks/input_pipeline.py --case photos224 --views simclr,simclr
  python benchmarks/input_pipeline.py --smoke              # seconds, on generated images

Cases:
  cifar_simclr  CIFAR-10 ImageFolder (real JPEGs, $SJMAE_CIFAR10_DIR or --cifar-dir) at 32 px,
                SJ-MAE's views (simclr recipe, two views), decoded uint8 cached in memory (the
                prepared cache is built on the first run, timed separately).
  jpeg224_rrc   A temporary folder of 224 px JPEGs (CIFAR images upsampled), decoded every step,
                RandomResizedCrop + flip (mae recipe) at 224 px. Kept to compare with older rows;
                upsampled 32 px images are not what ImageNet-size photos cost to decode.
  photos224     A temporary folder of natural-size JPEG photos (500 x 375 and the like, quality
                85-95), made from the two photographs scikit-learn ships (china.jpg, flower.jpg):
                random crops, rescales, flips and colour gains of real photos, so each file
                decodes like a photo of ImageNet's size. Views at 224 px (--views, default mae),
                pre-batches only (what the host does when the views are finished on the
                accelerator), one row per way of reading: threads or --workers processes, PIL or
                simplejpeg, PIL's or OpenCV's resize (data.resize, rows where OpenCV is
                installed), the folder or ArrayRecord shards made from it (data.prepare, timed).
Rows give images/s (wall clock), per core, and images per CPU-second of this process and its
workers (psutil): the per-core rate that does not depend on what else runs on the machine.
Each of the first two cases times the views finished on the host (data.augment_on_device=False);
--split-stages also times the pre-batches alone (data.augment_on_device=True, the default on
accelerators: everything the host still does when the views are computed in the training step).
--smoke runs every case on small generated folders (no CIFAR-10 needed), photos224 with two
rows (threads + PIL from the folder, 2 workers + simplejpeg from ArrayRecord).
"""

import argparse
import importlib.metadata
import importlib.util
import os
import sys
import tempfile
import time


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--case", choices=["cifar_simclr", "jpeg224_rrc", "photos224", "all"],
                      default="all")
  parser.add_argument("--cores", type=int, default=0,
                      help="pin the process to this many CPU cores (0: all available)")
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--steps", type=int, default=30, help="timed steps (after warm-up)")
  parser.add_argument("--jpegs", type=int, default=2000, help="224 px JPEGs to generate")
  parser.add_argument("--photos", type=int, default=1000,
                      help="natural-size photos to generate (photos224)")
  parser.add_argument("--views", default="mae",
                      help="photos224: recipes of the views, e.g. mae or simclr,simclr")
  parser.add_argument("--workers", type=int, default=0,
                      help="photos224: worker processes of the worker rows (0: one per core)")
  parser.add_argument("--rows", default="",
                      help="photos224: only rows whose label contains one of these "
                           "';'-separated strings, e.g. 'threads;arrayrecord, 2 worker'")
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
    args.photos = 40
    args.rows = args.rows or "folder, threads, pil;arrayrecord, 2 worker"
  args.cifar_dir = args.cifar_dir or config_lib.cifar10_dir()
  versions = {name: importlib.metadata.version(name)
              for name in ("jax", "grain", "pillow", "simplejpeg", "opencv-python-headless",
                           "array-record")
              if _installed(name)}
  print("versions: " + ", ".join(f"{name} {version}" for name, version in versions.items()))
  print(f"cores: {cores} (of {len(available)}), batch {args.batch}, {args.steps} timed steps, "
        f"{'TensorFlow loaded' if 'tensorflow' in sys.modules else 'no TensorFlow'}")

  def measure(cfg, label):
    start = time.perf_counter()
    train = data.build_train_pipeline(cfg, global_batch_size=args.batch, seed=0,
                                      process_index=0, process_count=1)
    for _ in range(3):  # warm-up: Grain threads / worker processes start, jit compile
      next(train)
    build = time.perf_counter() - start
    cpu_start = cpu_seconds()
    start = time.perf_counter()
    for _ in range(args.steps):
      batch = next(train)
    seconds = time.perf_counter() - start
    cpu = cpu_seconds() - cpu_start
    rate = args.steps * args.batch / seconds
    shapes = {key: value.shape for key, value in batch.items()}
    per_cpu = f"{args.steps * args.batch / cpu:8.0f}" if cpu > 0.05 else "     n/a"  # 10 ms ticks
    print(f"{label:<52} {rate:9.0f} images/s  {rate / cores:8.0f} images/s/core  "
          f"{per_cpu} images/CPU-s  "
          f"(build + warm-up {build:.1f} s) {shapes}", flush=True)
    train.close()
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

  if args.case in ("photos224", "all"):
    root = os.path.join(work_dir.name, "photos")
    start = time.perf_counter()
    count = make_photo_folder(root, args.photos)
    print(f"wrote {count} natural-size JPEG photos in {time.perf_counter() - start:.1f} s")
    from sjmae_jax.data import prepare  # pylint: disable=import-outside-toplevel
    shards = os.path.join(work_dir.name, "shards")
    start = time.perf_counter()
    prepare.prepare(f"folder:{root}", shards, data_dir=data_dir, log=lambda line: None)
    print(f"prepared ArrayRecord shards in {time.perf_counter() - start:.1f} s")
    workers = args.workers or (2 if args.smoke else cores)
    views = [name.strip() for name in args.views.split(",")]
    rows = [("folder", 0, "pil", "pil"), ("folder", 0, "simplejpeg", "pil"),
            ("folder", workers, "pil", "pil"), ("folder", workers, "simplejpeg", "pil"),
            ("arrayrecord", 0, "simplejpeg", "pil"), ("arrayrecord", workers, "simplejpeg", "pil")]
    if importlib.util.find_spec("cv2") is not None:  # OpenCV, in any of its wheels
      rows += [("folder", 0, "simplejpeg", "opencv"), ("arrayrecord", 0, "simplejpeg", "opencv"),
               ("arrayrecord", workers, "simplejpeg", "opencv")]
    wanted = [part for part in args.rows.split(";") if part]
    for source, num_workers, decoder, resize in rows:
      how = f"{num_workers} worker processes" if num_workers else "threads"
      label = f"(c) {source}, {how}, {decoder}" + (", opencv resize" if resize == "opencv" else "")
      if wanted and not any(word in label for word in wanted):
        continue
      cfg = data.default_config()
      cfg.source = f"folder:{root}" if source == "folder" else f"arrayrecord:{shards}"
      cfg.data_dir = data_dir
      cfg.img_size = 224
      cfg.views = views
      cfg.cache = False
      cfg.augment_on_device = True
      cfg.num_workers = num_workers
      cfg.decoder = decoder
      cfg.resize = resize
      measure(cfg, label)
  work_dir.cleanup()


def cpu_seconds():
  """CPU time (user + system) of this process and its live children (Grain's workers) so far.

  images / CPU-second is what one core dedicated to the pipeline gives, whatever else runs on
  the machine (on a shared machine images/s is not).
  """
  import psutil  # pylint: disable=import-outside-toplevel
  process = psutil.Process()
  total = sum(process.cpu_times()[:2])
  for child in process.children(recursive=True):
    try:
      total += sum(child.cpu_times()[:2])
    except psutil.NoSuchProcess:
      pass
  return total


def _installed(name):
  try:
    importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return False
  return True


def make_photo_folder(root, count, seed=0):
  """ROOT/train/<class>/*.jpg: `count` natural-size JPEGs (ImageNet-like sizes, quality 85-95)
  cut from scikit-learn's two sample photographs: random crop, rescale, flip and colour gain."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from sklearn.datasets import load_sample_images  # pylint: disable=import-outside-toplevel
  photos = load_sample_images().images
  rng = np.random.default_rng(seed)
  sizes = [(500, 375), (375, 500), (500, 333), (500, 400), (400, 500), (640, 480), (500, 500)]
  for index in range(count):
    photo = photos[index % len(photos)]
    height, width = photo.shape[:2]
    crop_h, crop_w = int(rng.integers(height // 2, height + 1)), int(rng.integers(width // 2,
                                                                                  width + 1))
    top, left = int(rng.integers(0, height - crop_h + 1)), int(rng.integers(0, width - crop_w + 1))
    image = Image.fromarray(photo[top:top + crop_h, left:left + crop_w]).resize(
        sizes[rng.integers(len(sizes))], Image.BICUBIC)
    if rng.random() < 0.5:
      image = image.transpose(Image.FLIP_LEFT_RIGHT)
    gained = np.asarray(image).astype(np.float32) * rng.uniform(0.8, 1.2, 3)
    class_dir = os.path.join(root, "train", f"class{index % 10}")
    os.makedirs(class_dir, exist_ok=True)
    Image.fromarray(np.clip(gained, 0, 255).astype(np.uint8)).save(
        os.path.join(class_dir, f"{index:05d}.jpg"), quality=int(rng.integers(85, 96)))
  return count


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
