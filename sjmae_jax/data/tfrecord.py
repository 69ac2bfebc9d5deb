"""TFDS splits stored as TFRecord, read with tf.data: the one part of the input that needs the
TensorFlow extra (pip install -r requirements-tf.txt). ArrayRecord splits never come here.

Only the records are read here (encoded image bytes and labels); decoding and augmentation are
the same NumPy / PIL code as for every other source.
"""

from sjmae_jax.data.errors import TF_EXTRA, DataError


def _tensorflow():
  try:
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise DataError(f"reading TFRecord datasets needs TensorFlow: {TF_EXTRA}") from None
  try:  # tf.data only runs host ops; keep a GPU build of TensorFlow off the accelerators.
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # TensorFlow already initialised its devices
    pass
  return tf


def _dataset(builder, split, image_key, label_key, shuffle_seed):
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  tf = _tensorflow()
  read_config = tfds.ReadConfig(shuffle_seed=shuffle_seed)
  dataset = builder.as_dataset(split=split, shuffle_files=shuffle_seed is not None,
                               read_config=read_config,
                               decoders={image_key: tfds.decode.SkipDecoding()})
  dataset = dataset.map(tf.autograph.experimental.do_not_convert(
      lambda example: (example[image_key], example[label_key])))
  options = tf.data.Options()
  options.deterministic = True
  return dataset.with_options(options)


def read_examples(builder, split, image_key, label_key):
  """(encoded image bytes, int label) of a split, in stored order."""
  for image, label in _dataset(builder, split, image_key, label_key, None).as_numpy_iterator():
    yield image, int(label)


def stream_examples(builder, split, image_key, label_key, *, shuffle_seed, shuffle_buffer,
                    process_index, process_count, drop_remainder, take=None, skip=0):
  """(encoded image bytes, int label) of process `process_index`'s even part of `split`.

  shuffle_seed None: stored order; otherwise files and a `shuffle_buffer` window shuffled from it.
  `skip` examples are read and dropped (never decoded), then at most `take` are returned.
  """
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  process_split = tfds.even_splits(split, n=process_count,
                                   drop_remainder=drop_remainder)[process_index]
  dataset = _dataset(builder, process_split, image_key, label_key, shuffle_seed)
  if shuffle_seed is not None:
    dataset = dataset.shuffle(shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
  if take is not None:
    dataset = dataset.take(take)
  for image, label in dataset.skip(skip).prefetch(2).as_numpy_iterator():
    yield image, int(label)
