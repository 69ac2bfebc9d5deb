"""A held-out split of an ImageFolder's train/ for choosing recipes without the test set.

  python benchmarks/cifar10_holdout.py SRC_DIR DEST_DIR [--every 10]

DEST_DIR/train/<class>/ links to the train images of SRC_DIR except every `every`-th of each
class (sorted by name), and DEST_DIR/test/<class>/ to those (CIFAR-10: 45,000 / 5,000, class
balanced). Train on DEST_DIR with data=cifar10 (SJMAE_CIFAR10_DIR=DEST_DIR) and every score is
on the held-out images; the real test/ is never read. Symbolic links (no copy); standard library.
"""
import argparse
import os
import sys
from pathlib import Path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


def make_holdout(src_dir, dest_dir, every: int = 10) -> dict:
  """Links DEST/{train,test}/<class>/<file> to SRC/train/<class>/<file>; returns the counts."""
  src_train = Path(src_dir).resolve() / "train"
  if not src_train.is_dir():
    raise FileNotFoundError(f"holdout: {src_train} is not a directory")
  if every < 2:
    raise ValueError(f"holdout: --every must be >= 2, got {every}")
  counts = {"train": 0, "test": 0}
  for class_dir in sorted(p for p in src_train.iterdir() if p.is_dir()):
    files = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    for index, path in enumerate(files):
      split = "test" if index % every == every - 1 else "train"
      target = Path(dest_dir) / split / class_dir.name / path.name
      target.parent.mkdir(parents=True, exist_ok=True)
      if not target.is_symlink():
        os.symlink(path, target)
      counts[split] += 1
  return counts


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("src_dir")
  parser.add_argument("dest_dir")
  parser.add_argument("--every", type=int, default=10)
  args = parser.parse_args(argv)
  try:
    counts = make_holdout(args.src_dir, args.dest_dir, args.every)
  except (OSError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"{args.dest_dir}: {counts['train']} train / {counts['test']} held-out images")
  return 0


if __name__ == "__main__":
  sys.exit(main())
