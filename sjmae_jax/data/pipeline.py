"""Train and eval input pipelines on Grain: NumPy / PIL pre-batches on the host, then a batched JAX
finishing step (on the host CPU, or inside the training step on the accelerator).

Order and randomness are pure functions of the seed and the position in the run:
  * epoch e visits the examples in a permutation drawn from (seed, e); the first
    steps_per_epoch * global_batch_size of it are used (drop remainder);
  * global batch b of the epoch is permutation[b * G:(b + 1) * G]; process p takes the p-th
    contiguous slice of length G / process_count, so processes are disjoint and equal-sized,
    and the local batches concatenated in process order are the global batch;
  * the augmentation uniforms of global batch b are drawn from (seed, e, b) for the whole global
    batch and sliced the same way, so batches do not depend on the process count either.
So `start_step = k` resumes exactly: epoch k // steps_per_epoch, batch k % steps_per_epoch, and
the skipped batches are never read, decoded or augmented. Random numbers come from NumPy
generators keyed by (seed, salt, epoch, batch) (augment_host.generator): no state to carry.

Grain runs it. In-memory images small enough to crop in the batched JAX step (digits, CIFAR-size
folder caches): a `grain.MapDataset` indexed by the global step whose element is a whole
pre-batch (a gather of uint8 images plus NumPy crop specs). Everything else (image files, TFDS
ArrayRecord records, large images): a MapDataset indexed by the example's position in the run
whose element is that image decoded and cropped with PIL, run in Grain's threads, then batched.
The Grain iterator's state is that position; `checkpoint_state(step)` is what the trainer saves
with the checkpoint of `step`, and `restore` checks it and starts from it. With worker processes
(data.num_workers, for images decoded at every read) the element is a whole pre-batch made in a
worker (`worker_dataset`): Grain deals the steps out to the workers in turn and merges them back
in order, so the batches are the same as with threads, and the dataset starts at the step.

The host builds a "pre-batch" (uint8 images or crops, crop specs, uniforms, labels); the JAX
function `augment_jax.finish_views` turns it into normalised views. With
`data.augment_on_device` (default 'auto': on when JAX's default backend is not the CPU) the
iterator yields the pre-batch and the trainer applies `pipeline.finish_batch` inside its jitted
step (see TrainPipeline); otherwise it runs jitted on the host CPU inside the iterator.

TFDS splits stored as TFRecord (the TensorFlow extra, tfrecord.py) cannot be read by index and
are streamed instead: each process reads its own even part of the split, file order and shuffle
buffer seeded from (seed, epoch, process), uniforms from (seed, epoch, process, batch).
Deterministic and resumable the same way, but the batches depend on the process count.
"""

import atexit
import collections
import concurrent.futures
import functools
import gc
import itertools
import json
import logging
import math
import os
import re
import signal
import threading
import weakref

import grain
from absl import flags as absl_flags
import jax
import numpy as np

from sjmae_jax.data import augment_host, augment_jax
from sjmae_jax.data.config import IMAGENET_MEAN, IMAGENET_STD, RECIPE_KEYS
from sjmae_jax.data.errors import DataError
from sjmae_jax.data.sources import ArraySplit, DatasetInfo, TfdsStreamSplit, open_source

log = logging.getLogger(__name__)

# Salts that keep the permutation and the augmentation streams independent.
_PERMUTATION_SALT = 0
_AUGMENT_SALT = 1
_EVAL_SALT = 2
_STREAM_SALT = 3
# An endless run as a finite length for Grain (times the local batch, it still fits an int64).
_MAX_STEPS = 2**40


def dataset_info(cfg):
  source = open_source(cfg)
  sizes = {split: source.num_examples(split) for split in (cfg.train_split, cfg.eval_split)}
  return DatasetInfo(source=cfg.source, num_classes=source.num_classes,
                     class_names=list(source.class_names), split_sizes=sizes,
                     num_examples_fn=source.num_examples)


def resolve_augment_on_device(value):
  """data.augment_on_device: True / False, or 'auto' = on when JAX computes on an accelerator.
  'True' / 'False' as strings too (a config whose references were resolved keeps a str field)."""
  if isinstance(value, (bool, np.bool_)):
    return bool(value)
  if value == "auto":
    return jax.default_backend() != "cpu"
  if str(value).lower() in ("true", "false"):
    return str(value).lower() == "true"
  raise DataError(f"data.augment_on_device={value!r} (expected 'auto', True or False)")


def _resolve_processes(process_index, process_count, global_batch_size):
  if process_index is None or process_count is None:
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise DataError(f"process_index {process_index} out of range for process_count "
                    f"{process_count}")
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise DataError(f"global_batch_size {global_batch_size} is not a positive multiple of "
                    f"process_count {process_count}")
  return process_index, process_count, global_batch_size // process_count


def _view_recipes(cfg):
  views = cfg.views
  if isinstance(views, str):
    views = [name.strip() for name in views.split(",") if name.strip()]
  if not views:
    raise DataError("data.views is empty (expected recipe names, e.g. ['simclr', 'simclr'])")
  return [_recipe(cfg, name) for name in views]


def _recipe(cfg, name):
  if name not in cfg.recipes:
    raise DataError(f"unknown recipe {name!r} in data.views / data.eval_recipe (recipes: "
                    f"{', '.join(sorted(cfg.recipes.keys()))})")
  recipe = cfg.recipes[name]
  missing = sorted(set(RECIPE_KEYS) - set(recipe.keys()))
  if missing:
    raise DataError(f"data.recipes.{name} lacks {', '.join(missing)} (a recipe has every key of "
                    "data.recipes.mae)")
  if recipe.crop not in ("random_resized_crop", "center", "pad_crop"):
    raise DataError(f"data.recipes.{name}.crop={recipe.crop!r} (expected "
                    "'random_resized_crop', 'center' or 'pad_crop')")
  if recipe.crop == "pad_crop" and not 0 <= int(recipe.pad) <= int(cfg.img_size):
    raise DataError(f"data.recipes.{name}.pad={recipe.pad!r} (expected 0 to img_size "
                    f"{cfg.img_size} pixels)")
  if recipe.interpolation not in ("bicubic", "bilinear"):
    raise DataError(f"data.recipes.{name}.interpolation={recipe.interpolation!r} (expected "
                    "'bicubic' or 'bilinear')")
  return recipe


def _normalization(cfg):
  if cfg.normalize == "imagenet":
    return IMAGENET_MEAN, IMAGENET_STD
  if cfg.normalize == "custom":
    return tuple(cfg.mean), tuple(cfg.std)
  if cfg.normalize == "none":
    return None
  raise DataError(f"data.normalize={cfg.normalize!r} (expected 'imagenet', 'custom' or 'none')")


def _check_read_config(cfg):
  if cfg.prefetch < 1:
    raise DataError(f"data.prefetch={cfg.prefetch} (expected >= 1)")
  resolve_num_threads(cfg.num_threads)
  resolve_num_workers(cfg.num_workers)


def _count(key, value):
  """An integer >= 0 from a config value ('2' from the command line too), else a DataError."""
  try:
    count = int(value)
  except (TypeError, ValueError):
    count = -1
  if count < 0 or str(value).strip() != str(count):
    raise DataError(f"data.{key}={value!r} (expected 'auto' or an integer >= 0)")
  return count


# Threads beyond about two per core only take turns on the GIL and the caches (2-core machine,
# 224 px photos: 16 threads make ~12 % fewer images per CPU-second than 2-4; BENCHMARKS.md).
MAX_AUTO_THREADS = 16


def resolve_num_threads(value):
  """data.num_threads: an int >= 0, or 'auto' = two per host core, at most MAX_AUTO_THREADS."""
  if value == "auto":
    return min(MAX_AUTO_THREADS, 2 * host_cores())
  return _count("num_threads", value)


def host_cores():
  """CPU cores this process may run on (its affinity mask: taskset, cgroups' cpusets)."""
  return len(os.sched_getaffinity(0))


# 'auto' starts workers for splits at least this large: below, their start-up (a fresh
# interpreter importing JAX and Grain, seconds each) costs more than they save.
AUTO_WORKERS_MIN_EXAMPLES = 10_000


def resolve_num_workers(value, num_examples=None):
  """data.num_workers: an int >= 0, or 'auto' = one worker process per host core (none for
  splits under AUTO_WORKERS_MIN_EXAMPLES examples)."""
  if value == "auto":
    small = num_examples is not None and num_examples < AUTO_WORKERS_MIN_EXAMPLES
    return 0 if small else host_cores()
  return _count("num_workers", value)


def _worker_init(worker_index, num_workers):
  """Runs first in each Grain worker process: end it when its parent is gone (kill -9 of the
  trainer leaves no orphan blocked on a full queue), and let the parent handle Ctrl-C."""
  del worker_index, num_workers
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  parent = os.getppid()

  def watch():
    while os.getppid() == parent:
      threading.Event().wait(1.0)
    os._exit(1)  # pylint: disable=protected-access
  threading.Thread(target=watch, daemon=True, name="sjmae-parent-watch").start()


_WORKER_DIED_RE = re.compile(r"terminated unexpectedly with exit code (-?\d+)")


def _worker_died(error, worker, num_workers):
  """Grain's 'Worker process was terminated unexpectedly' as one DataError line, or None."""
  match = _WORKER_DIED_RE.search(str(error))
  if not match:
    return None
  code = int(match.group(1))
  how = f"exit code {code}"
  if code < 0:
    how = f"killed by {signal.Signals(-code).name}"
    if -code == signal.SIGKILL:
      how += ", e.g. by the kernel when the host ran out of memory"
  return DataError(f"input worker process {worker} of {num_workers} died ({how}); lower "
                   "data.num_workers or data.prefetch if memory is short")


def _read_options(cfg, buffer_size):
  """Grain's threads and buffer: `buffer_size` elements ahead, at most one thread each."""
  return grain.ReadOptions(num_threads=min(resolve_num_threads(cfg.num_threads), buffer_size),
                           prefetch_buffer_size=buffer_size)


# Cached images up to this many pixels are cropped in the batched JAX step (resampling matrices
# cost O(H * W * size) per image); larger ones are cropped one at a time on the host.
_BATCHED_CROP_MAX_PIXELS = 128 * 128


def _crops_in_batch(split_data):
  if not isinstance(split_data, ArraySplit):
    return False
  height, width = split_data.images.shape[1:3]
  return height * width <= _BATCHED_CROP_MAX_PIXELS


class _PreBatcher:
  """Host side of the views: crop specs for cached batches, or crops of single images."""

  def __init__(self, recipes, size, crop_fraction, resize="pil"):
    self.recipes = recipes
    self.size = size
    self.crop_fraction = crop_fraction
    self.resize = resize  # augment_host.resolve_resize's result

  def batch_specs(self, height, width, uniforms):
    """Images of one size H x W, uniforms (B, K, U) -> CropSpec rows (B, K, 8)."""
    return np.stack([augment_host.crop_specs(uniforms[:, view], height, width, recipe, self.size,
                                             self.crop_fraction)
                     for view, recipe in enumerate(self.recipes)], axis=1)

  def crops(self, image, uniforms):
    """uint8 [H, W, 3] of any size, uniforms (K, U) -> uint8 crops (K, S, S, 3)."""
    height, width = image.shape[:2]
    return np.stack([
        augment_host.crop_one(image, augment_host.crop_specs(
            uniforms[view], height, width, recipe, self.size, self.crop_fraction),
                              self.size, recipe.interpolation, self.resize)
        for view, recipe in enumerate(self.recipes)])

  def array_pre_batch(self, split_data, indices, uniforms):
    raw = split_data.images[indices]
    return {"raw": raw, "crop_spec": self.batch_specs(raw.shape[1], raw.shape[2], uniforms),
            "uniforms": uniforms, "label": split_data.labels[indices].astype(np.int32)}

  def example(self, split_data, index, uniforms):
    image, label = split_data.read(index)
    return {"crops": self.crops(image, uniforms), "uniforms": uniforms,
            "label": np.int32(label)}


_jitted_finish_fns = {}


def _jitted(finish_fn):
  """One jitted function per distinct (recipes, size, normalisation), so compiles are reused."""
  recipes = finish_fn.keywords["recipes"]
  key = (tuple(json.dumps(recipe.to_dict(), sort_keys=True) for recipe in recipes),
         finish_fn.keywords["size"], finish_fn.keywords["normalization"])
  if key not in _jitted_finish_fns:
    _jitted_finish_fns[key] = jax.jit(finish_fn)
  return _jitted_finish_fns[key]


def _finished_on_host(pre_batches, finish_fn):
  """Applies the jitted finishing step on the host CPU, dispatching one batch ahead."""
  try:  # local: in a multi-process run jax.devices('cpu')[0] belongs to process 0
    host = jax.local_devices(backend="cpu")[0]
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


class _TrainOrder:
  """Which examples and which uniforms local batch `step` of a process gets: pure functions."""

  def __init__(self, seed, num_examples, steps_per_epoch, global_batch, local_batch,
               process_index, num_views):
    self.seed, self.num_examples, self.steps_per_epoch = seed, num_examples, steps_per_epoch
    self.global_batch, self.local_batch, self.num_views = global_batch, local_batch, num_views
    self.local = slice(process_index * local_batch, (process_index + 1) * local_batch)
    self._make_caches()

  def _make_caches(self):
    # Per-example elements ask for the same epoch / batch many times, from several threads.
    self._permutation = functools.lru_cache(maxsize=2)(self._draw_permutation)
    self._uniforms = functools.lru_cache(maxsize=16)(self._draw_uniforms)

  def __getstate__(self):  # sent to Grain's worker processes without its caches
    return {key: value for key, value in self.__dict__.items()
            if key not in ("_permutation", "_uniforms")}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._make_caches()

  def _draw_permutation(self, epoch):
    generator = augment_host.generator(self.seed, _PERMUTATION_SALT, epoch)
    return generator.permutation(self.num_examples)

  def _draw_uniforms(self, epoch, batch):
    uniforms = augment_host.draw_uniforms((self.seed, _AUGMENT_SALT, epoch, batch),
                                          (self.global_batch, self.num_views))
    return uniforms[self.local].copy()  # a copy: the cache keeps this process's rows only

  def indices(self, step):
    epoch, batch = divmod(step, self.steps_per_epoch)
    start = batch * self.global_batch + self.local.start
    return self._permutation(epoch)[start:start + self.local_batch]

  def uniforms(self, step):
    return self._uniforms(*divmod(step, self.steps_per_epoch))


def _close_pipeline(pipeline_ref):
  pipeline = pipeline_ref()
  if pipeline is not None:
    pipeline.close()


class TrainPipeline:
  """Infinite iterator of local training batches, positioned at `start_step`.

  Each batch: 'images' float32 (local_batch, K, H, W, C), 'label' int32 (local_batch,).
  `step` is the global step of the next batch.

  With `augment_on_device` (data.augment_on_device, 'auto' = on accelerators) the iterator
  yields pre-batches instead (uint8 images, crop specs, uniforms, label; every array has the
  local batch as its leading axis, so it shards like a batch) and the trainer computes the views
  on the accelerator with the pure function `finish_batch(pre_batch) -> {'images', 'label'}`
  inside its jitted step.
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
    self.augment_on_device = resolve_augment_on_device(cfg.augment_on_device)
    self.finish_batch = augment_jax.make_finish_fn(recipes, self.image_size, _normalization(cfg))
    self._pre_batcher = _PreBatcher(recipes, self.image_size, cfg.eval_crop_fraction,
                                    augment_host.resolve_resize(cfg.resize))
    self._cfg = cfg
    source = open_source(cfg)
    self.split_data = source.load(cfg.train_split, cfg.cache)
    self.num_examples = self.split_data.num_examples
    self.steps_per_epoch = self.num_examples // global_batch_size
    if self.steps_per_epoch == 0:
      raise DataError(f"train split {cfg.train_split!r} of {cfg.source} has "
                      f"{self.num_examples} examples, fewer than global_batch_size "
                      f"{global_batch_size}")
    if start_step < 0:
      raise DataError(f"start_step must be >= 0, got {start_step}")
    _check_read_config(cfg)
    # Worker processes pay where each image is decoded at every read; cached arrays are
    # gathered in one batched step, and TFRecord streams are read in this process.
    self.num_workers = (0 if _crops_in_batch(self.split_data)
                        or isinstance(self.split_data, TfdsStreamSplit)
                        else resolve_num_workers(cfg.num_workers, self.num_examples))
    self._order = _TrainOrder(self.seed, self.num_examples, self.steps_per_epoch,
                              global_batch_size, self.local_batch_size, self.process_index,
                              self.num_views)
    self.step = int(start_step)
    self._iterator = None
    self._worker_iterator = None

  def __iter__(self):
    return self

  def close(self):
    """Stops the worker processes (if any); also done when the pipeline is dropped and at exit.
    The pipeline is then spent."""
    iterator, self._worker_iterator = getattr(self, "_worker_iterator", None), None
    if iterator is not None:
      iterator.close()
      self._iterator = iter(())  # spent
      del iterator
      # Grain leaves unstarted iterators in reference cycles; collected now, not at interpreter
      # teardown, where their __del__ fails noisily ('Exception ignored in ...').
      gc.collect()

  def __del__(self):
    self.close()

  def __next__(self):
    if self._iterator is None:
      self._iterator_start = self.step
      if isinstance(self.split_data, TfdsStreamSplit):
        pre_batches = self._stream_pre_batches()
      elif self.num_workers:
        pre_batches = iter(self.worker_dataset(self.step))
        self._worker_iterator = pre_batches
        # Before multiprocessing's own exit handler (atexit runs the last registered first):
        # workers stopped and shared memory released while the interpreter is still whole.
        atexit.register(_close_pipeline, weakref.ref(self))
      else:
        pre_batches = iter(self.dataset())
        pre_batches.set_state(self._grain_state(self.step))
      self._iterator = (pre_batches if self.augment_on_device
                        else _finished_on_host(pre_batches, self.finish_batch))
    try:
      batch = next(self._iterator)
    except RuntimeError as error:  # Grain's message when a worker process died
      worker = (self.step - self._iterator_start) % max(self.num_workers, 1)
      died = _worker_died(error, worker, self.num_workers)
      if died is None:
        raise
      raise died from None
    self.step += 1
    return batch

  # -------------------------------------------------------------------------------------------
  # Checkpointing: the position is the step; the rest says whether the order is still the same.

  def _grain_state(self, step):
    if isinstance(self.split_data, TfdsStreamSplit):
      return None
    per_step = 1 if _crops_in_batch(self.split_data) else self.local_batch_size
    return {"next_index": int(step) * per_step}

  def _identity(self):
    cfg = self._cfg
    return {"seed": self.seed, "global_batch_size": self.global_batch_size,
            "source": cfg.source, "split": cfg.train_split, "num_examples": self.num_examples}

  def checkpoint_state(self, step):
    """JSON-able input state at global step `step`, saved with that step's checkpoint."""
    return {"step": int(step), **self._identity(), "grain": self._grain_state(step)}

  def restore(self, saved):
    """Positions the pipeline at a checkpoint's `checkpoint_state` (None: an older checkpoint
    without one; the position is then the step it was built with). Warns when the order from
    here differs from the uninterrupted run's (seed, batch size or data changed)."""
    if saved is None:
      return
    if self._iterator is not None:
      raise RuntimeError("TrainPipeline.restore must come before the first batch")
    current = self._identity()
    changed = [f"{key} {saved.get(key)!r} -> {value!r}" for key, value in current.items()
               if saved.get(key) != value]
    if changed:
      log.warning("Resuming at step %d with other input settings than the checkpoint (%s): the "
                  "data order from here differs from an uninterrupted run", saved["step"],
                  "; ".join(changed))
    self.step = int(saved["step"])

  # -------------------------------------------------------------------------------------------

  def dataset(self):
    """The grain.IterDataset of this process's pre-batches from step 0 (set its iterator's
    state to start elsewhere: `_grain_state(step)`)."""
    order, split_data, pre_batcher = self._order, self.split_data, self._pre_batcher
    prefetch = int(self._cfg.prefetch)
    if _crops_in_batch(split_data):
      def pre_batch(step):
        return pre_batcher.array_pre_batch(split_data, order.indices(step), order.uniforms(step))
      return grain.MapDataset.range(_MAX_STEPS).map(pre_batch).to_iter_dataset(
          _read_options(self._cfg, prefetch))

    local_batch = self.local_batch_size

    def example(position):
      step, row = divmod(position, local_batch)
      return pre_batcher.example(split_data, order.indices(step)[row], order.uniforms(step)[row])
    dataset = grain.MapDataset.range(_MAX_STEPS * local_batch).map(example)
    dataset = dataset.to_iter_dataset(_read_options(self._cfg, prefetch * local_batch))
    return dataset.batch(local_batch, drop_remainder=True)

  def worker_dataset(self, start_step):
    """The same pre-batches from `start_step` on, made in `num_workers` Grain worker processes.

    Each element is a whole pre-batch (the examples of dataset(), batched the same way), so
    Grain's split of the elements over workers (worker w makes the batches start_step + w,
    + w + num_workers, ...) and its round-robin merge give the batches in order: the same
    batches as dataset(), whatever the worker count. The start is part of the dataset (no
    worker state to restore), so a run may resume with another worker count.
    """
    order, split_data, pre_batcher = self._order, self.split_data, self._pre_batcher
    local_batch, prefetch = self.local_batch_size, int(self._cfg.prefetch)

    def example(position):
      step, row = divmod(position, local_batch)
      return pre_batcher.example(split_data, order.indices(step)[row], order.uniforms(step)[row])
    dataset = grain.MapDataset.range(start_step * local_batch, _MAX_STEPS * local_batch)
    dataset = dataset.map(example).batch(local_batch, drop_remainder=True)
    dataset = dataset.to_iter_dataset(_read_options(self._cfg, prefetch))
    if not absl_flags.FLAGS.is_parsed():  # Grain reads its flags' defaults when it starts workers
      absl_flags.FLAGS.mark_as_parsed()
    return dataset.mp_prefetch(
        grain.multiprocessing.MultiprocessingOptions(num_workers=self.num_workers,
                                                     per_worker_buffer_size=prefetch),
        worker_init_fn=_worker_init)

  def _stream_pre_batches(self):
    from sjmae_jax.data import tfrecord  # pylint: disable=import-outside-toplevel
    cfg, stream = self._cfg, self.split_data
    steps, local_batch, num_views = self.steps_per_epoch, self.local_batch_size, self.num_views
    epoch, start_batch = divmod(self.step, steps)
    decoder = augment_host.resolve_decoder(cfg.decoder)
    threads = max(resolve_num_threads(cfg.num_threads), 1)
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
      while True:
        shuffle_seed = int(augment_host.generator(
            self.seed, _STREAM_SALT, epoch, self.process_index).integers(2**31))
        examples = tfrecord.stream_examples(
            stream.builder, stream.split, stream.image_key, stream.label_key,
            shuffle_seed=shuffle_seed, shuffle_buffer=int(cfg.shuffle_buffer),
            process_index=self.process_index, process_count=self.process_count,
            drop_remainder=True, take=steps * local_batch, skip=start_batch * local_batch)
        for batch in range(start_batch, steps):
          chunk = list(itertools.islice(examples, local_batch))
          uniforms = augment_host.draw_uniforms(
              (self.seed, _STREAM_SALT, epoch, self.process_index, batch),
              (local_batch, num_views))
          yield _stream_pre_batch(pool, self._pre_batcher, chunk, uniforms, decoder)
        epoch, start_batch = epoch + 1, 0


def _stream_pre_batch(pool, pre_batcher, chunk, uniforms, decoder):
  crops = pool.map(lambda row: pre_batcher.crops(
      augment_host.decode_image(chunk[row][0], decoder), uniforms[row]), range(len(chunk)))
  return {"crops": np.stack(list(crops)), "uniforms": uniforms,
          "label": np.asarray([label for _, label in chunk], np.int32)}


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
    self._pre_batcher = _PreBatcher(recipes, self.image_size, cfg.eval_crop_fraction,
                                    augment_host.resolve_resize(cfg.resize))
    self._finish = augment_jax.make_finish_fn(recipes, self.image_size, _normalization(cfg))
    source = open_source(cfg)
    self.split_data = source.load(self.split, cfg.cache)
    self.num_examples = self.split_data.num_examples
    _check_read_config(cfg)
    if isinstance(self.split_data, TfdsStreamSplit):
      largest_shard = math.ceil(self.num_examples / self.process_count)
      self.num_batches = math.ceil(largest_shard / self.local_batch_size)
    else:
      self.num_batches = math.ceil(self.num_examples / global_batch_size)
    local = slice(self.process_index * self.local_batch_size,
                  (self.process_index + 1) * self.local_batch_size)
    # The default eval recipe draws nothing random; a custom one still gets fixed numbers.
    self._uniforms = functools.lru_cache(maxsize=16)(
        lambda batch: augment_host.draw_uniforms((0, _EVAL_SALT, batch),
                                                 (global_batch_size, 1))[local].copy())

  def __len__(self):
    return self.num_batches

  def __iter__(self):
    if isinstance(self.split_data, TfdsStreamSplit):
      pre_batches = self._stream_pre_batches()
    else:
      pre_batches = iter(self.dataset())
    return _finished_on_host(pre_batches, self._finish)

  def _positions(self, batch):
    start = batch * self.global_batch_size + self.process_index * self.local_batch_size
    return np.arange(start, start + self.local_batch_size)

  def dataset(self):
    """The grain.IterDataset of this process's pre-batches of one pass."""
    num_examples, split_data, pre_batcher = self.num_examples, self.split_data, self._pre_batcher
    prefetch = int(self._cfg.prefetch)
    if _crops_in_batch(split_data):
      def pre_batch(batch):
        positions = self._positions(batch)
        result = pre_batcher.array_pre_batch(split_data, np.minimum(positions, num_examples - 1),
                                             self._uniforms(batch))
        return dict(result, valid=positions < num_examples)
      return grain.MapDataset.range(self.num_batches).map(pre_batch).to_iter_dataset(
          _read_options(self._cfg, prefetch))

    local_batch = self.local_batch_size

    def example(local_position):
      batch, row = divmod(local_position, local_batch)
      position = self._positions(batch)[row]
      result = pre_batcher.example(split_data, min(position, num_examples - 1),
                                   self._uniforms(batch)[row])
      return dict(result, valid=np.bool_(position < num_examples))
    dataset = grain.MapDataset.range(self.num_batches * local_batch).map(example)
    dataset = dataset.to_iter_dataset(_read_options(self._cfg, prefetch * local_batch))
    return dataset.batch(local_batch, drop_remainder=True)

  def _stream_pre_batches(self):
    from sjmae_jax.data import tfrecord  # pylint: disable=import-outside-toplevel
    stream, local_batch, size = self.split_data, self.local_batch_size, self.image_size
    examples = tfrecord.stream_examples(
        stream.builder, stream.split, stream.image_key, stream.label_key, shuffle_seed=None,
        shuffle_buffer=0, process_index=self.process_index, process_count=self.process_count,
        drop_remainder=False)
    with concurrent.futures.ThreadPoolExecutor(
        max(resolve_num_threads(self._cfg.num_threads), 1)) as pool:
      for batch in range(self.num_batches):
        chunk = list(itertools.islice(examples, local_batch))
        uniforms = augment_host.draw_uniforms((0, _EVAL_SALT, self.process_index, batch),
                                              (local_batch, 1))
        crops = np.zeros((local_batch, 1, size, size, 3), np.uint8)
        labels = np.zeros(local_batch, np.int32)
        if chunk:
          pre_batch = _stream_pre_batch(pool, self._pre_batcher, chunk, uniforms[:len(chunk)],
                                        augment_host.resolve_decoder(self._cfg.decoder))
          crops[:len(chunk)], labels[:len(chunk)] = pre_batch["crops"], pre_batch["label"]
        yield {"crops": crops, "uniforms": uniforms, "label": labels,
               "valid": np.arange(local_batch) < len(chunk)}


def build_train_pipeline(cfg, global_batch_size, seed, start_step=0, process_index=None,
                         process_count=None):
  return TrainPipeline(cfg, global_batch_size, seed, start_step, process_index, process_count)


def build_eval_pipeline(cfg, split=None, global_batch_size=None, process_index=None,
                        process_count=None):
  if global_batch_size is None:
    raise DataError("build_eval_pipeline needs global_batch_size")
  return EvalPipeline(cfg, split, global_batch_size, process_index, process_count)
