"""Train and eval input pipelines: tf.data on the host, then a batched JAX finishing step.

Order and randomness are pure functions of the seed and the position in the run:
  * epoch e visits the examples in a permutation drawn from (seed, e); the first
    steps_per_epoch * global_batch_size of it are used (drop remainder);
  * global batch b of the epoch is permutation[b * G:(b + 1) * G]; process p takes the p-th
    contiguous slice of length G / process_count, so processes are disjoint and equal-sized,
    and the local batches concatenated in process order are the global batch;
  * the augmentation uniforms of global batch b are drawn from (seed, e, b) for the whole global
    batch and sliced the same way, so batches do not depend on the process count either.
So `start_step = k` resumes exactly: epoch k // steps_per_epoch, batch k % steps_per_epoch, and
the skipped batches are never read, decoded or augmented.

The host builds a "pre-batch" (uint8 images or crops, crop specs, uniforms, labels); the JAX
function `augment_jax.finish_views` turns it into normalised views. By default that runs jitted
on the host CPU inside the iterator; with `augment_on_device=True` the iterator yields the
pre-batch and the trainer applies `pipeline.finish_batch` inside its step (see TrainPipeline).

TFDS splits that are not held in memory (`cache=False`, or images of varying size) are streamed
instead: each process reads its own even part of the split, file order and shuffle buffer seeded
from (seed, epoch, process), uniforms from (seed, epoch, process, batch). Deterministic and
resumable the same way, but the batches depend on the process count.
"""

import collections
import json
import math

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from sjmae_jax.data import augment_jax
from sjmae_jax.data import augment_tf
from sjmae_jax.data.config import IMAGENET_MEAN, IMAGENET_STD, RECIPE_KEYS
from sjmae_jax.data.sources import ArraySplit, DataError, DatasetInfo, TfdsStreamSplit, open_source

# tf.data only runs host ops; keep a GPU build of TensorFlow off the accelerators JAX uses.
try:
  tf.config.set_visible_devices([], 'GPU')
except RuntimeError:  # TensorFlow already initialised its devices
  pass

# Salts that keep the permutation and the augmentation streams independent.
_PERMUTATION_SALT = 0
_AUGMENT_SALT = 1
_EVAL_SALT = 2


def dataset_info(cfg):
  source = open_source(cfg)
  sizes = {split: source.num_examples(split) for split in (cfg.train_split, cfg.eval_split)}
  return DatasetInfo(source=cfg.source, num_classes=source.num_classes,
                     class_names=list(source.class_names), split_sizes=sizes,
                     num_examples_fn=source.num_examples)


def _resolve_processes(process_index, process_count, global_batch_size):
  if process_index is None or process_count is None:
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise DataError(f'process_index {process_index} out of range for process_count '
                    f'{process_count}')
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise DataError(f'global_batch_size {global_batch_size} is not a positive multiple of '
                    f'process_count {process_count}')
  return process_index, process_count, global_batch_size // process_count


def _view_recipes(cfg):
  views = cfg.views
  if isinstance(views, str):
    views = [name.strip() for name in views.split(',') if name.strip()]
  if not views:
    raise DataError('data.views is empty (expected recipe names, e.g. [\'simclr\', \'simclr\'])')
  return [_recipe(cfg, name) for name in views]


def _recipe(cfg, name):
  if name not in cfg.recipes:
    raise DataError(f'unknown recipe {name!r} in data.views / data.eval_recipe (recipes: '
                    f'{", ".join(sorted(cfg.recipes.keys()))})')
  recipe = cfg.recipes[name]
  missing = sorted(set(RECIPE_KEYS) - set(recipe.keys()))
  if missing:
    raise DataError(f'data.recipes.{name} lacks {", ".join(missing)} (a recipe has every key of '
                    'data.recipes.mae)')
  if recipe.crop not in ('random_resized_crop', 'center'):
    raise DataError(f'data.recipes.{name}.crop={recipe.crop!r} (expected '
                    "'random_resized_crop' or 'center')")
  if recipe.interpolation not in ('bicubic', 'bilinear'):
    raise DataError(f'data.recipes.{name}.interpolation={recipe.interpolation!r} (expected '
                    "'bicubic' or 'bilinear')")
  return recipe


def _normalization(cfg):
  if cfg.normalize == 'imagenet':
    return IMAGENET_MEAN, IMAGENET_STD
  if cfg.normalize == 'custom':
    return tuple(cfg.mean), tuple(cfg.std)
  if cfg.normalize == 'none':
    return None
  raise DataError(f"data.normalize={cfg.normalize!r} (expected 'imagenet', 'custom' or 'none')")


def _seed_pair(seed, salt):
  return tf.constant([int(seed) % (2**63), salt], tf.int64)


def _fold(key, *values):
  for value in values:
    key = tf.random.experimental.stateless_fold_in(key, tf.cast(value, tf.int64))
  return key



# Cached images up to this many pixels are cropped in the batched JAX step (resampling matrices
# cost O(H * W * size) per image); larger ones are cropped one at a time on the host.
_BATCHED_CROP_MAX_PIXELS = 128 * 128


def _image_reader(split_data):
  """index -> (uint8 [H, W, 3] image, int32 label), one example at a time."""
  labels = tf.constant(split_data.labels, tf.int32)
  if isinstance(split_data, ArraySplit):
    images = tf.constant(split_data.images)
    return lambda index: (tf.gather(images, index), tf.gather(labels, index))
  files = tf.constant(split_data.files)

  def read(index):
    data = tf.io.read_file(tf.gather(files, index))
    return augment_tf.decode_image(data), tf.gather(labels, index)
  return read


def _crops_in_batch(split_data):
  if not isinstance(split_data, ArraySplit):
    return False
  height, width = split_data.images.shape[1:3]
  return height * width <= _BATCHED_CROP_MAX_PIXELS


class _PreBatcher:
  """Host side of the views: crop specs for cached batches, or crops of single images."""

  def __init__(self, recipes, size, crop_fraction):
    self.recipes = recipes
    self.size = size
    self.crop_fraction = crop_fraction

  def batch_specs(self, images, uniforms):
    """uint8 [B, H, W, 3] of one size, uniforms (B, K, U) -> CropSpec rows (B, K, 8)."""
    height, width = images.shape[1], images.shape[2]
    return tf.stack([augment_tf.crop_specs(uniforms[:, view], height, width, recipe, self.size,
                                           self.crop_fraction)
                     for view, recipe in enumerate(self.recipes)], axis=1)

  def crops(self, image, uniforms):
    """uint8 [H, W, 3] of any size, uniforms (K, U) -> uint8 crops (K, S, S, 3)."""
    shape = tf.shape(image)
    crops = []
    for view, recipe in enumerate(self.recipes):
      crop_spec = augment_tf.crop_specs(uniforms[view], shape[0], shape[1], recipe, self.size,
                                        self.crop_fraction)
      crops.append(augment_tf.crop_one(image, crop_spec, self.size, recipe.interpolation))
    return tf.stack(crops)


def _tfds_read(stream, split, shuffle_seed):
  """Encoded image bytes and label of a TFDS split (other features dropped: they may not batch)."""
  read_config = tfds.ReadConfig(shuffle_seed=shuffle_seed)
  dataset = stream.builder.as_dataset(
      split=split, shuffle_files=shuffle_seed is not None, read_config=read_config,
      decoders={stream.image_key: tfds.decode.SkipDecoding()})
  return _map(dataset, lambda example: {stream.image_key: example[stream.image_key],
                                        stream.label_key: example[stream.label_key]})


def _no_autograph(function):
  # The map functions are plain tensor code; AutoGraph conversion would only cost tracing time.
  return tf.autograph.experimental.do_not_convert(function)


def _map(dataset, function, num_parallel_calls=None):
  if num_parallel_calls is None:
    return dataset.map(_no_autograph(function))
  return dataset.map(_no_autograph(function), num_parallel_calls=num_parallel_calls,
                     deterministic=True)


def _python_seed(*values):
  return int(np.random.SeedSequence([int(v) % (2**63) for v in values]).generate_state(1)[0])


def _deterministic(dataset):
  options = tf.data.Options()
  options.deterministic = True
  return dataset.with_options(options)


_jitted_finish_fns = {}


def _jitted(finish_fn):
  """One jitted function per distinct (recipes, size, normalisation), so compiles are reused."""
  recipes = finish_fn.keywords['recipes']
  key = (tuple(json.dumps(recipe.to_dict(), sort_keys=True) for recipe in recipes),
         finish_fn.keywords['size'], finish_fn.keywords['normalization'])
  if key not in _jitted_finish_fns:
    _jitted_finish_fns[key] = jax.jit(finish_fn)
  return _jitted_finish_fns[key]


def _finished_on_host(pre_batches, finish_fn):
  """Applies the jitted finishing step on the host CPU, dispatching one batch ahead."""
  try:  # local: in a multi-process run jax.devices('cpu')[0] belongs to process 0
    host = jax.local_devices(backend='cpu')[0]
  except RuntimeError:  # JAX_PLATFORMS excludes the CPU backend
    host = jax.local_devices()[0]
  finish = _jitted(finish_fn)
  pending = collections.deque()
  for pre_batch in pre_batches:
    pending.append(finish(jax.device_put(pre_batch, host)))
    if len(pending) > 1:
      yield jax.tree.map(np.asarray, pending.popleft())
  while pending:
    yield jax.tree.map(np.asarray, pending.popleft())


class TrainPipeline:
  """Infinite iterator of local training batches, positioned at `start_step`.

  Each batch: 'images' float32 (local_batch, K, H, W, C), 'label' int32 (local_batch,).
  `step` is the global step of the next batch.

  With `augment_on_device` (data.augment_on_device=True) the iterator yields pre-batches
  instead (uint8 images, crop specs, uniforms, label; every array has the local batch as its
  leading axis, so it shards like a batch) and the trainer computes the views on the
  accelerator with the pure function `finish_batch(pre_batch) -> {'images', 'label'}` inside
  its jitted step.
  """

  def __init__(self, cfg, global_batch_size, seed, start_step=0, process_index=None,
               process_count=None):
    self.process_index, self.process_count, self.local_batch_size = _resolve_processes(
        process_index, process_count, global_batch_size)
    self.global_batch_size = global_batch_size
    self.seed = int(seed)
    recipes = _view_recipes(cfg)
    self.num_views = len(recipes)
    self.image_size = int(cfg.img_size)
    self.augment_on_device = bool(cfg.augment_on_device)
    self.finish_batch = augment_jax.make_finish_fn(recipes, self.image_size, _normalization(cfg))
    self._pre_batcher = _PreBatcher(recipes, self.image_size, cfg.eval_crop_fraction)
    self._cfg = cfg
    source = open_source(cfg)
    self.split_data = source.load(cfg.train_split, cfg.cache)
    self.num_examples = self.split_data.num_examples
    self.steps_per_epoch = self.num_examples // global_batch_size
    if self.steps_per_epoch == 0:
      raise DataError(f'train split {cfg.train_split!r} of {cfg.source} has '
                      f'{self.num_examples} examples, fewer than global_batch_size '
                      f'{global_batch_size}')
    if start_step < 0:
      raise DataError(f'start_step must be >= 0, got {start_step}')
    self.step = int(start_step)
    self._iterator = None

  def __iter__(self):
    return self

  def __next__(self):
    if self._iterator is None:
      if isinstance(self.split_data, TfdsStreamSplit):
        pre_batches = self._stream_pre_batches()
      else:
        pre_batches = self._indexed_dataset().as_numpy_iterator()
      self._iterator = (pre_batches if self.augment_on_device
                        else _finished_on_host(pre_batches, self.finish_batch))
    batch = next(self._iterator)
    self.step += 1
    return batch

  def _indexed_dataset(self):
    cfg = self._cfg
    num_examples, steps = self.num_examples, self.steps_per_epoch
    global_batch, local_batch = self.global_batch_size, self.local_batch_size
    process_count, process_index = self.process_count, self.process_index
    num_views = self.num_views
    permutation_key = _seed_pair(self.seed, _PERMUTATION_SALT)
    augment_key = _seed_pair(self.seed, _AUGMENT_SALT)
    start_epoch, start_batch = divmod(self.step, steps)
    pre_batcher = self._pre_batcher
    parallel = cfg.num_parallel_calls

    def epoch_batches(epoch):
      order = tf.random.experimental.stateless_shuffle(
          tf.range(num_examples, dtype=tf.int64), seed=_fold(permutation_key, epoch))
      order = tf.reshape(order[:steps * global_batch], [steps, process_count, local_batch])
      return tf.data.Dataset.from_tensor_slices(
          (tf.fill([steps], epoch), tf.range(steps, dtype=tf.int64), order[:, process_index]))

    def local_uniforms(epoch, batch):
      uniforms = augment_tf.draw_uniforms(_fold(augment_key, epoch, batch),
                                          [global_batch, num_views])
      return uniforms[process_index * local_batch:(process_index + 1) * local_batch]

    dataset = tf.data.Dataset.range(start_epoch, np.iinfo(np.int64).max)
    dataset = dataset.flat_map(_no_autograph(epoch_batches)).skip(start_batch)

    if _crops_in_batch(self.split_data):
      images = tf.constant(self.split_data.images)
      labels = tf.constant(self.split_data.labels, tf.int32)

      def make_pre_batch(epoch, batch, indices):
        uniforms = local_uniforms(epoch, batch)
        raw = tf.gather(images, indices)
        return {'raw': raw, 'crop_spec': pre_batcher.batch_specs(raw, uniforms),
                'uniforms': uniforms, 'label': tf.gather(labels, indices)}
      dataset = _map(dataset, make_pre_batch, parallel)
    else:  # decoded files, or large cached images: cropped one at a time
      read = _image_reader(self.split_data)

      def make_example(index, uniforms):
        image, label = read(index)
        return {'crops': pre_batcher.crops(image, uniforms), 'uniforms': uniforms,
                'label': label}
      dataset = _map(dataset,
                     lambda epoch, batch, indices: (indices, local_uniforms(epoch, batch)))
      dataset = _map(dataset.unbatch(), make_example, parallel)
      dataset = dataset.batch(local_batch, drop_remainder=True)
    return _deterministic(dataset.prefetch(cfg.prefetch))

  def _stream_pre_batches(self):
    cfg = self._cfg
    stream = self.split_data
    steps, local_batch, num_views = self.steps_per_epoch, self.local_batch_size, self.num_views
    augment_key = _seed_pair(self.seed, _AUGMENT_SALT)
    process_split = tfds.even_splits(stream.split, n=self.process_count,
                                     drop_remainder=True)[self.process_index]
    pre_batcher = self._pre_batcher

    def make_example(example, uniforms):
      image = augment_tf.decode_image(example[stream.image_key])
      return {'crops': pre_batcher.crops(image, uniforms), 'uniforms': uniforms,
              'label': tf.cast(example[stream.label_key], tf.int32)}

    epoch, start_batch = divmod(self.step, steps)
    while True:
      shuffle_seed = _python_seed(self.seed, epoch, self.process_index)
      epoch_key = _fold(augment_key, epoch, self.process_index)
      dataset = _tfds_read(stream, process_split, shuffle_seed)
      dataset = dataset.shuffle(cfg.shuffle_buffer, seed=shuffle_seed,
                                reshuffle_each_iteration=False)
      dataset = dataset.take(steps * local_batch).batch(local_batch, drop_remainder=True)
      dataset = dataset.enumerate().skip(start_batch)
      dataset = _map(dataset, lambda batch, examples, key=epoch_key: (
          examples, augment_tf.draw_uniforms(_fold(key, batch), [local_batch, num_views])))
      dataset = _map(dataset.unbatch(), make_example, cfg.num_parallel_calls)
      dataset = dataset.batch(local_batch, drop_remainder=True).prefetch(cfg.prefetch)
      yield from _deterministic(dataset).as_numpy_iterator()
      epoch, start_batch = epoch + 1, 0


class EvalPipeline:
  """One deterministic pass over a split per iteration; batches padded to full size.

  Each batch: 'images' float32 (local_batch, 1, H, W, C), 'label' int32, 'valid' bool.
  Every process yields `num_batches` batches (padding included), as SPMD steps need.
  """

  def __init__(self, cfg, split, global_batch_size, process_index=None, process_count=None):
    self.process_index, self.process_count, self.local_batch_size = _resolve_processes(
        process_index, process_count, global_batch_size)
    self.global_batch_size = global_batch_size
    self.split = cfg.eval_split if split is None else split
    self.image_size = int(cfg.img_size)
    self._cfg = cfg
    recipes = [_recipe(cfg, cfg.eval_recipe)]
    self._pre_batcher = _PreBatcher(recipes, self.image_size, cfg.eval_crop_fraction)
    self._finish = augment_jax.make_finish_fn(recipes, self.image_size, _normalization(cfg))
    source = open_source(cfg)
    self.split_data = source.load(self.split, cfg.cache)
    self.num_examples = self.split_data.num_examples
    if isinstance(self.split_data, TfdsStreamSplit):
      largest_shard = math.ceil(self.num_examples / self.process_count)
      self.num_batches = math.ceil(largest_shard / self.local_batch_size)
    else:
      self.num_batches = math.ceil(self.num_examples / global_batch_size)

  def __len__(self):
    return self.num_batches

  def __iter__(self):
    if isinstance(self.split_data, TfdsStreamSplit):
      dataset = self._stream_dataset()
    else:
      dataset = self._indexed_dataset()
    pre_batches = _deterministic(dataset.prefetch(self._cfg.prefetch)).as_numpy_iterator()
    return _finished_on_host(pre_batches, self._finish)

  def _uniforms(self, batch):
    # The default eval recipe draws nothing random; a custom one still gets fixed numbers.
    key = _fold(_seed_pair(0, _EVAL_SALT), batch)
    return augment_tf.draw_uniforms(key, [self.local_batch_size, 1])

  def _indexed_dataset(self):
    num_examples, local_batch = self.num_examples, self.local_batch_size
    positions = np.arange(self.num_batches * self.global_batch_size).reshape(
        self.num_batches, self.process_count, local_batch)[:, self.process_index]
    batches = tf.data.Dataset.from_tensor_slices((np.arange(self.num_batches), positions))
    parallel = self._cfg.num_parallel_calls
    pre_batcher = self._pre_batcher

    if _crops_in_batch(self.split_data):
      images = tf.constant(self.split_data.images)
      labels = tf.constant(self.split_data.labels, tf.int32)

      def make_pre_batch(batch, position):
        index = tf.minimum(position, num_examples - 1)
        uniforms = self._uniforms(batch)
        raw = tf.gather(images, index)
        return {'raw': raw, 'crop_spec': pre_batcher.batch_specs(raw, uniforms),
                'uniforms': uniforms, 'label': tf.gather(labels, index),
                'valid': position < num_examples}
      return _map(batches, make_pre_batch, parallel)

    read = _image_reader(self.split_data)

    def make_example(position, uniforms):
      image, label = read(tf.minimum(position, num_examples - 1))
      return {'crops': pre_batcher.crops(image, uniforms), 'uniforms': uniforms, 'label': label,
              'valid': position < num_examples}
    examples = _map(batches, lambda batch, position: (position, self._uniforms(batch)))
    examples = _map(examples.unbatch(), make_example, parallel)
    return examples.batch(local_batch, drop_remainder=True)

  def _stream_dataset(self):
    stream = self.split_data
    local_batch, size = self.local_batch_size, self.image_size
    process_split = tfds.even_splits(stream.split, n=self.process_count,
                                     drop_remainder=False)[self.process_index]
    pre_batcher = self._pre_batcher
    key = _seed_pair(0, _EVAL_SALT)

    def make_example(position, example):
      uniforms = augment_tf.draw_uniforms(_fold(key, position), [1])
      image = augment_tf.decode_image(example[stream.image_key])
      return {'crops': pre_batcher.crops(image, uniforms), 'uniforms': uniforms,
              'label': tf.cast(example[stream.label_key], tf.int32), 'valid': tf.constant(True)}

    dataset = _tfds_read(stream, process_split, shuffle_seed=None).enumerate()
    dataset = _map(dataset, make_example, self._cfg.num_parallel_calls)
    padding = tf.data.Dataset.from_tensors({
        'crops': tf.zeros([1, size, size, 3], tf.uint8),
        'uniforms': tf.zeros([1, augment_tf.NUM_UNIFORMS], tf.float32),
        'label': tf.constant(0, tf.int32),
        'valid': tf.constant(False)}).repeat()
    dataset = dataset.concatenate(padding).take(self.num_batches * local_batch)
    return dataset.batch(local_batch, drop_remainder=True)


def build_train_pipeline(cfg, global_batch_size, seed, start_step=0, process_index=None,
                         process_count=None):
  return TrainPipeline(cfg, global_batch_size, seed, start_step, process_index, process_count)


def build_eval_pipeline(cfg, split=None, global_batch_size=None, process_index=None,
                        process_count=None):
  if global_batch_size is None:
    raise DataError('build_eval_pipeline needs global_batch_size')
  return EvalPipeline(cfg, split, global_batch_size, process_index, process_count)
