"""Input pipeline throughput (images/s), all cores and per CPU core.

  python benchmarks/input_pipeline.py                      # both cases, all cores
  python benchmarks/input_pipeline.py --cores 1            # pinned to one core
  python benchmarks/input_pipeline.py --case cifar_simclr --split-stages

Cases:
  cifar_simclr  CIFAR-10 ImageFolder (real JPEGs, default ../shared/data/cifar10 or
                $SJMAE_CIFAR10_DIR) at 32 px, simclr recipe, two views, decoded uint8 cached in
                memory (the prepared cache is built on the first run, timed separately).
  jpeg224_rrc   A temporary folder of 224 px JPEGs (CIFAR images upsampled), decoded every step,
                RandomResizedCrop + flip (mae recipe) at 224 px.
--split-stages also times the host part alone (data.augment_on_device=True: everything the
host still does when the views are computed on the accelerator).
"""

import argparse
import os
import sys
import tempfile
import time


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--case', choices=['cifar_simclr', 'jpeg224_rrc', 'all'], default='all')
  parser.add_argument('--cores', type=int, default=0,
                      help='pin the process to this many CPU cores (0: all available)')
  parser.add_argument('--batch', type=int, default=256)
  parser.add_argument('--steps', type=int, default=30, help='timed steps (after warm-up)')
  parser.add_argument('--jpegs', type=int, default=2000, help='224 px JPEGs to generate')
  parser.add_argument('--split-stages', action='store_true')
  parser.add_argument('--cifar-dir', default=os.environ.get(
      'SJMAE_CIFAR10_DIR', os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..',
                                        'shared', 'data', 'cifar10')))
  parser.add_argument('--data-dir', default=None,
                      help='where prepared caches go (default: a temporary directory)')
  return parser.parse_args()


def main():
  args = parse_args()
  available = sorted(os.sched_getaffinity(0))
  if args.cores:
    # Before TF / XLA start: their thread pools are sized from the affinity mask.
    os.sched_setaffinity(0, available[:args.cores])
  cores = len(os.sched_getaffinity(0))
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
  from sjmae_jax import data  # pylint: disable=import-outside-toplevel

  work_dir = tempfile.TemporaryDirectory(prefix='sjmae_bench_')
  data_dir = args.data_dir or work_dir.name
  print(f'cores: {cores} (of {len(available)}), batch {args.batch}, {args.steps} timed steps')

  def measure(cfg, label):
    start = time.perf_counter()
    train = data.build_train_pipeline(cfg, global_batch_size=args.batch, seed=0,
                                      process_index=0, process_count=1)
    build = time.perf_counter() - start
    for _ in range(3):  # warm-up: tf.data start, jit compile
      next(train)
    start = time.perf_counter()
    for _ in range(args.steps):
      batch = next(train)
    seconds = time.perf_counter() - start
    rate = args.steps * args.batch / seconds
    shapes = {key: value.shape for key, value in batch.items()}
    print(f'{label:<44} {rate:9.0f} images/s  {rate / cores:8.0f} images/s/core  '
          f'(build {build:.1f} s) {shapes}')
    return rate

  if args.case in ('cifar_simclr', 'all'):
    if not os.path.isdir(args.cifar_dir):
      sys.exit(f'CIFAR-10 folder not found: {args.cifar_dir} (set --cifar-dir)')
    cfg = data.default_config()
    cfg.source = f'folder:{os.path.abspath(args.cifar_dir)}'
    cfg.data_dir = data_dir
    cfg.img_size = 32
    cfg.views = ['simclr', 'simclr']
    start = time.perf_counter()
    info = data.dataset_info(cfg)
    data.build_eval_pipeline(cfg, split='train', global_batch_size=args.batch, process_index=0,
                             process_count=1)  # prepares the decoded cache of the train split
    print(f'prepare CIFAR-10 train ({info.num_examples("train")} JPEGs -> uint8 cache): '
          f'{time.perf_counter() - start:.1f} s')
    measure(cfg, '(a) CIFAR-10 32px simclr x2, host')
    if args.split_stages:
      cfg.augment_on_device = True
      measure(cfg, '(a) same, host part only (augment_on_device)')

  if args.case in ('jpeg224_rrc', 'all'):
    root = os.path.join(work_dir.name, 'jpeg224')
    start = time.perf_counter()
    count = make_jpeg_folder(args.cifar_dir, root, args.jpegs)
    print(f'wrote {count} 224 px JPEGs in {time.perf_counter() - start:.1f} s')
    cfg = data.default_config()
    cfg.source = f'folder:{root}'
    cfg.data_dir = data_dir
    cfg.img_size = 224
    cfg.views = ['mae']
    cfg.cache = False  # decode every step
    measure(cfg, '(b) 224px JPEG decode + RRC + flip, host')
    if args.split_stages:
      cfg.augment_on_device = True
      measure(cfg, '(b) same, host part only (augment_on_device)')
  work_dir.cleanup()


def make_jpeg_folder(cifar_dir, root, count):
  """ImageFolder of `count` 224 px JPEGs: CIFAR-10 train images upsampled (bicubic)."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  train_dir = os.path.join(cifar_dir, 'train')
  classes = sorted(os.listdir(train_dir))
  per_class = max(1, count // len(classes))
  written = 0
  for class_name in classes:
    os.makedirs(os.path.join(root, 'train', class_name))
    names = sorted(os.listdir(os.path.join(train_dir, class_name)))[:per_class]
    for name in names:
      with Image.open(os.path.join(train_dir, class_name, name)) as image:
        big = image.convert('RGB').resize((224, 224), Image.BICUBIC)
      big.save(os.path.join(root, 'train', class_name, os.path.splitext(name)[0] + '.jpg'),
               quality=90)
      written += 1
  return written


if __name__ == '__main__':
  main()
