"""The embedded offline dataset: scikit-learn's 8x8 digits, held in memory.

scikit-learn ships the data inside its package, so preparing needs no network. Images are uint8
RGB (the gray level 0..16 scaled to 0..255 and replicated); a fixed permutation gives an 80/20
train/test split that never changes.
"""

import numpy as np

DIGITS_NAME = "sjmae_digits"
DIGITS_FILE = "sjmae_digits_v1.npz"  # the prepared arrays, kept under data.data_dir
SPLITS = ("train", "test")
_SPLIT_SEED = 0
_TRAIN_FRACTION = 0.8


def digits_arrays():
  """(images uint8 [N, 8, 8, 3], labels int64 [N]) in the fixed split order: train then test."""
  from sklearn.datasets import load_digits  # local: sklearn is slow to import
  digits = load_digits()
  gray = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
  images = np.repeat(gray[..., None], 3, axis=-1)
  order = np.random.RandomState(_SPLIT_SEED).permutation(len(images))
  return images[order], digits.target[order].astype(np.int64)


def digits_splits():
  """{'train': (images, labels), 'test': (images, labels)}: 1438 / 359 examples."""
  images, labels = digits_arrays()
  num_train = int(round(_TRAIN_FRACTION * len(images)))
  return {"train": (images[:num_train], labels[:num_train]),
          "test": (images[num_train:], labels[num_train:])}
