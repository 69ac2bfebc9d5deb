"""The embedded offline dataset: scikit-learn's 8x8 digits served as a real TFDS dataset.

scikit-learn ships the data inside its package, so preparing needs no network. Images are uint8
RGB (the gray level 0..16 scaled to 0..255 and replicated); a fixed permutation gives an 80/20
train/test split that never changes.
"""

import numpy as np
import tensorflow_datasets as tfds

DIGITS_NAME = 'sjmae_digits'
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


class SjmaeDigits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn digits (1797 images, 8x8, 10 classes), 80/20 fixed split."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'sklearn load_digits, 80/20 split by RandomState(0) permutation.'}

  def _info(self):
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(8, 8, 3), dtype=np.uint8),
            'label': tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=('image', 'label'),
        description='scikit-learn digits, 8x8 gray replicated to RGB, 0..255.',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    images, labels = digits_arrays()
    num_train = int(round(_TRAIN_FRACTION * len(images)))
    return {
        'train': self._generate_examples(images[:num_train], labels[:num_train], 0),
        'test': self._generate_examples(images[num_train:], labels[num_train:], num_train),
    }

  def _generate_examples(self, images, labels, first_key):
    for offset, (image, label) in enumerate(zip(images, labels)):
      yield first_key + offset, {'image': image, 'label': int(label)}
