"""Data sources: the embedded digits, any TFDS dataset, an ImageFolder tree, ArrayRecord shards
made from either by `python -m sjmae_jax.data.prepare`.

A source answers the metadata questions (classes, split sizes) and hands a split to the pipeline
as one of:
  * `ArraySplit`: decoded uint8 images of one size held in memory (random access, fastest);
  * `FileSplit`: image files decoded with PIL at every read (random access by index);
  * `RecordSplit`: a TFDS split in a random-access format (ArrayRecord), read through
    `tfds.data_source` and decoded with PIL at every read; no TensorFlow involved;
  * `ShardSplit`: records of our own ArrayRecord shards (prepare.py), decoded at every read;
  * `TfdsStreamSplit`: a TFDS split stored as TFRecord, read sequentially with tf.data (needs the
    TensorFlow extra; see tfrecord.py).
Every bad-input case raises `DataError` with a one-line message, before anything is compiled.
"""

import concurrent.futures
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import re
import threading

import numpy as np
from etils import epath

from sjmae_jax.data import digits
from sjmae_jax.data.augment_host import decode_image, resolve_decoder
from sjmae_jax.data.errors import TF_EXTRA, DataError  # noqa: F401  (DataError: re-exported)
from sjmae_jax.data.records import decode_record, read_index

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


@dataclasses.dataclass
class ArraySplit:
  images: np.ndarray  # uint8 [N, H, W, 3]
  labels: np.ndarray  # int32 [N]

  @property
  def num_examples(self):
    return len(self.labels)

  def read(self, index):
    return self.images[index], int(self.labels[index])


@dataclasses.dataclass
class FileSplit:
  files: list  # path strings (local or gs://), decoded at every read
  labels: np.ndarray  # int32 [N]
  decoder: str = "pil"  # augment_host.decode_image's decoder

  @property
  def num_examples(self):
    return len(self.labels)

  def read(self, index):
    image, error = _decode_file(self.files[index], self.decoder)
    if error is not None:
      raise DataError(f"cannot decode image {self.files[index]}: {error}")
    return image, int(self.labels[index])


@dataclasses.dataclass
class RecordSplit:
  source: object  # a tfds data source (random access) whose images are left encoded
  image_key: str
  label_key: str
  description: str
  decoder: str = "pil"

  @property
  def num_examples(self):
    return len(self.source)

  def read(self, index):
    example = self.source[int(index)]
    try:
      image = decode_image(example[self.image_key], self.decoder)
    except Exception as error:  # PIL raises many types for bad data  # pylint: disable=broad-except
      raise DataError(f"{self.description}: cannot decode the image of example {index}: "
                      f"{_first_line(error)}") from None
    return image, int(example[self.label_key])


@dataclasses.dataclass
class TfdsStreamSplit:
  builder: object  # tfds.core.DatasetBuilder, prepared, stored as TFRecord
  split: str
  num_examples: int
  image_key: str
  label_key: str


@dataclasses.dataclass
class DatasetInfo:
  source: str
  num_classes: int
  class_names: list
  split_sizes: dict  # the configured train / eval split expressions -> number of examples
  num_examples_fn: object = dataclasses.field(repr=False, default=None)

  def num_examples(self, split):
    if split not in self.split_sizes:
      self.split_sizes[split] = self.num_examples_fn(split)
    return self.split_sizes[split]


def _first_line(error):
  text = str(error)
  return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


# ---------------------------------------------------------------------------------------------
# Split expressions for folders ('train', 'train[:80%]', 'train[100:]', 'train+test').

_SLICE_RE = re.compile(r"^(?P<name>[^\[\]+]+)(\[(?P<start>-?\d*%?):(?P<stop>-?\d*%?)\])?$")


def _boundary(text, size, default):
  if text == "":
    return default
  if text.endswith("%"):
    value = int(round(size * int(text[:-1]) / 100.0))
  else:
    value = int(text)
  if value < 0:
    value += size
  return min(max(value, 0), size)


def parse_split(expression):
  """'train[:80%]+test' -> [('train', ':80%' parts)] as (name, start_text, stop_text)."""
  parts = []
  for part in expression.replace(" ", "").split("+"):
    match = _SLICE_RE.match(part)
    if not match:
      raise DataError(f"cannot parse split expression {expression!r} "
                      "(expected e.g. 'train', 'train[:80%]', 'train[1000:]', 'train+test')")
    parts.append((match["name"], match["start"] or "", match["stop"] or ""))
  return parts


def slice_indices(expression, split_sizes):
  """Absolute (name, start, stop) ranges of a split expression, given each named split's size."""
  ranges = []
  for name, start, stop in parse_split(expression):
    size = split_sizes(name)
    ranges.append((name, _boundary(start, size, 0), _boundary(stop, size, size)))
  return ranges


# ---------------------------------------------------------------------------------------------
# The embedded digits: arrays from scikit-learn, prepared once into data_dir.

_array_cache = {}
_array_cache_lock = threading.Lock()


class DigitsSource:
  """scikit-learn digits (1797 images, 8x8, 10 classes), fixed 80/20 train/test split."""

  description = "digits"
  num_classes = 10
  class_names = [str(digit) for digit in range(10)]

  def __init__(self, cfg):
    data_dir = epath.Path(cfg.data_dir).expanduser()
    self.path = data_dir / digits.DIGITS_FILE
    key = ("digits", os.fspath(self.path))
    with _array_cache_lock:
      if key not in _array_cache:
        _array_cache[key] = self._prepare(data_dir)
      self.splits = _array_cache[key]

  def _prepare(self, data_dir):
    if not self.path.exists():
      with _preparing(os.fspath(data_dir), digits.DIGITS_NAME):
        if not self.path.exists():
          log.info("Preparing the embedded digits dataset in %s", self.path)
          try:
            splits = digits.digits_splits()
          except ImportError as error:
            raise DataError(f"preparing the digits dataset needs scikit-learn ({error}): pip "
                            f"install scikit-learn, or copy {digits.DIGITS_FILE} prepared by "
                            f"another run into data.data_dir ({data_dir})") from None
          data_dir.mkdir(parents=True, exist_ok=True)
          arrays = {f"{split}_{kind}": array for split, pair in splits.items()
                    for kind, array in zip(("images", "labels"), pair)}
          _atomic_write(self.path, lambda f: np.savez(f, **arrays))
    with self.path.open("rb") as f, np.load(f) as stored:
      return {split: ArraySplit(stored[f"{split}_images"],
                                stored[f"{split}_labels"].astype(np.int32))
              for split in digits.SPLITS}

  def _named(self, name):
    if name not in self.splits:
      raise DataError(f"digits: bad split {name!r} (splits: {', '.join(digits.SPLITS)})")
    return self.splits[name]

  def num_examples(self, split):
    sizes = lambda name: self._named(name).num_examples
    return sum(stop - start for _, start, stop in slice_indices(split, sizes))

  def load(self, split, cache):
    del cache  # always in memory: 1797 images of 8x8
    sizes = lambda name: self._named(name).num_examples
    parts = [(self._named(name), start, stop)
             for name, start, stop in slice_indices(split, sizes)]
    if sum(stop - start for _, start, stop in parts) == 0:
      raise DataError(f"split {split!r} of digits has no images")
    return ArraySplit(np.concatenate([part.images[start:stop] for part, start, stop in parts]),
                      np.concatenate([part.labels[start:stop] for part, start, stop in parts]))


# ---------------------------------------------------------------------------------------------
# TFDS: read through tfds.data_source (ArrayRecord) without TensorFlow; TFRecord needs the
# TensorFlow extra (tfrecord.py).


def _import_tfds():
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  except ImportError as error:
    raise DataError(f"TFDS sources need tensorflow-datasets ({_first_line(error)}): "
                    "pip install tensorflow-datasets array-record") from None
  return tfds


def _needs_tensorflow(error):
  """Whether `error` (or one in its chain) is the failed import of TensorFlow."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, ImportError) and "No module named 'tensorflow" in str(error):
      return True
    error = error.__cause__ or error.__context__
  return False


class TfdsSource:

  def __init__(self, cfg, builder, name):
    tfds = _import_tfds()
    self.description = f"TFDS dataset {name!r}"
    self.name = name
    self.builder = builder
    self.decoder = resolve_decoder(cfg.decoder)
    self.image_key = cfg.image_key
    self.label_key = cfg.label_key
    features = builder.info.features
    for key in (self.image_key, self.label_key):
      if key not in features:
        raise DataError(f"{self.description} has no feature {key!r} (features: "
                        f"{', '.join(sorted(features.keys()))}); set data.image_key/label_key")
    label_feature = features[self.label_key]
    if not isinstance(label_feature, tfds.features.ClassLabel):
      raise DataError(f"{self.description}: feature {self.label_key!r} is not a class label "
                      f"({type(label_feature).__name__}); set data.label_key")
    if not isinstance(features[self.image_key], tfds.features.Image):
      raise DataError(f"{self.description}: feature {self.image_key!r} is not an image "
                      f"({type(features[self.image_key]).__name__}); set data.image_key")
    self.num_classes = int(label_feature.num_classes)
    self.class_names = list(label_feature.names)
    self.image_shape = tuple(features[self.image_key].shape)
    self.cache_max_bytes = cfg.cache_max_gb * 2**30
    self.file_format = builder.info.file_format
    self.random_access = self.file_format in tfds.core.FileFormat.with_random_access()

  def num_examples(self, split):
    try:
      return int(self.builder.info.splits[split].num_examples)
    except (KeyError, ValueError, AssertionError) as error:
      available = ", ".join(sorted(self.builder.info.splits.keys()))
      raise DataError(f"{self.description}: bad split {split!r} (splits: {available}): "
                      f"{str(error).splitlines()[0] if str(error) else ''}") from None

  def load(self, split, cache):
    num_examples = self.num_examples(split)
    if num_examples == 0:
      raise DataError(f"{self.description}: split {split!r} has no examples")
    if not self.random_access:
      self._check_tensorflow()
    fixed_size = None not in self.image_shape
    if cache and fixed_size:
      cache_bytes = num_examples * int(np.prod(self.image_shape[:2])) * 3
      if cache_bytes > self.cache_max_bytes:
        log.warning("%s split %r: %.1f GB decoded is over data.cache_max_gb; decoding it at "
                    "every read", self.description, split, cache_bytes / 2**30)
        cache = False
    if cache and fixed_size:
      key = (os.fspath(self.builder.data_dir), split, self.image_key, self.label_key)
      with _array_cache_lock:
        if key not in _array_cache:
          _array_cache[key] = self._read_arrays(split)
        return _array_cache[key]
    if self.random_access:
      return self._records(split)
    return TfdsStreamSplit(self.builder, split, num_examples, self.image_key, self.label_key)

  def _check_tensorflow(self):
    try:
      import tensorflow  # pylint: disable=import-outside-toplevel,unused-import
    except ImportError:
      raise DataError(
          f"{self.description} is stored as {self.file_format.value}, which needs TensorFlow to "
          f"read: {TF_EXTRA}; or prepare it as ArrayRecord (tfds build {self.name} "
          f"--file_format=array_record --data_dir={self.builder.data_dir_root})") from None

  def _records(self, split):
    tfds = _import_tfds()
    source = self.builder.as_data_source(
        split=split, decoders={self.image_key: tfds.decode.SkipDecoding()})
    return RecordSplit(source, self.image_key, self.label_key, self.description, self.decoder)

  def _read_arrays(self, split):
    if self.random_access:
      records = self._records(split)
      with concurrent.futures.ThreadPoolExecutor(_io_threads()) as pool:
        examples = list(pool.map(records.read, range(records.num_examples), chunksize=256))
    else:
      from sjmae_jax.data import tfrecord  # pylint: disable=import-outside-toplevel
      examples = [(decode_image(image, self.decoder), label)
                  for image, label in tfrecord.read_examples(self.builder, split, self.image_key,
                                                             self.label_key)]
    images = np.stack([image for image, _ in examples])
    return ArraySplit(images, np.asarray([label for _, label in examples], np.int32))


def _tfds_source(cfg, name):
  tfds = _import_tfds()
  data_dir = os.fspath(epath.Path(cfg.data_dir).expanduser())
  description = f"TFDS dataset {name!r}"
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise DataError(f"unknown TFDS dataset {name!r} (data.source=tfds:{name}); "
                    "see https://www.tensorflow.org/datasets/catalog") from None
  except ValueError as error:  # bad version / config name
    raise DataError(f"{description}: {str(error).splitlines()[0]}") from None
  if not builder.is_prepared():
    if not cfg.download:
      raise DataError(f"{description} is not prepared under {data_dir} (data.data_dir); "
                      f"prepare it with `tfds build {name} --file_format=array_record` or set "
                      "data.download=True")
    with _preparing(data_dir, name):
      # Prepared as ArrayRecord, which Grain reads by index without TensorFlow.
      builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
      if not builder.is_prepared():
        try:
          builder.download_and_prepare()
        except Exception as error:  # pylint: disable=broad-except
          if not _needs_tensorflow(error):
            raise
          raise DataError(f"preparing {description} needs TensorFlow: {TF_EXTRA}; or prepare "
                          f"it where TensorFlow is installed (tfds build {name} "
                          f"--file_format=array_record --data_dir={data_dir})") from None
  return TfdsSource(cfg, builder, name)


@contextlib.contextmanager
def _preparing(data_dir: str, name: str):
  """One process at a time prepares `name` in a local data_dir (the others wait, then find it
  prepared): TFDS's final rename fails for the second of two concurrent preparations."""
  if "://" in data_dir:  # object stores: no flock; prepare them once beforehand
    yield
    return
  os.makedirs(data_dir, exist_ok=True)
  with open(os.path.join(data_dir, f".{name}.prepare.lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------
# ImageFolder: ROOT/<split>/<class>/<image>. Every path goes through etils.epath, so ROOT and
# data.data_dir (where the prepared cache is kept) may be gs:// as well as local.


def _is_uri(path):
  return "://" in os.fspath(path)


def _absolute(path):
  """Local paths made absolute (they name the cache); URIs such as gs://b/x are kept as they are."""
  path = epath.Path(path).expanduser()
  return path if _is_uri(path) else path.resolve()


def _file_signature(path):
  """Size and modification time of a file, to notice that it changed.

  Local files: os.stat (epath's stat rounds the time to seconds and looks up the owner's name,
  ~100x slower). gs:// and other URIs: epath's stat, one request each.
  """
  if _is_uri(path):
    stat = epath.Path(path).stat()
    return f"{stat.length}\0{stat.mtime}"
  stat = os.stat(path)
  return f"{stat.st_size}\0{stat.st_mtime_ns}"


class FolderSource:

  def __init__(self, cfg, root):
    self.root = _absolute(root)
    self.description = f"image folder {self.root}"
    self.data_dir = epath.Path(cfg.data_dir).expanduser()
    self.skip_corrupt = bool(cfg.skip_corrupt)
    self.cache_max_bytes = cfg.cache_max_gb * 2**30
    self.decoder = resolve_decoder(cfg.decoder)
    if not self.root.is_dir():
      raise DataError(f"image folder does not exist: {self.root} (data.source=folder:{root})")
    split_dirs = _subdirectories(self.root)
    if not split_dirs:
      raise DataError(f"image folder {self.root} has no split folders "
                      "(expected ROOT/<split>/<class>/<image>)")
    self.split_names = split_dirs
    # Labels come from the sorted union of class folder names over all splits, so a class
    # means the same label in every split even when a split lacks some classes.
    class_names = set()
    for split in split_dirs:
      class_names.update(_subdirectories(self.root / split))
    self.class_names = sorted(class_names)
    self.num_classes = len(self.class_names)
    if not self.class_names:
      with_images = [name for name in split_dirs if any(
          entry.name.lower().endswith(IMAGE_EXTENSIONS) for entry in (self.root / name).iterdir())]
      if with_images:  # torchvision's ImageFolder layout: ROOT/<class>/<image>
        raise DataError(
            f"image folder {self.root} has images right under {', '.join(with_images[:3])}"
            f"{', ...' if len(with_images) > 3 else ''}: the split level is missing (expected "
            f"ROOT/<split>/<class>/<image>); move the class folders into {self.root / 'train'} "
            f"and a test set's into {self.root / 'test'}, or point data.source at a folder that "
            f"has them")
      raise DataError(f"image folder {self.root} has no class folders "
                      "(expected ROOT/<split>/<class>/<image>)")
    self._listing = {}
    self._prepared = {}
    self.skipped_files = {}  # split -> undecodable files skipped (data.skip_corrupt=True)

  def list_split(self, split):
    """Sorted (files, labels) of one named split folder; errors on empty classes / splits."""
    if split in self._listing:
      return self._listing[split]
    split_dir = self.root / split
    if not split_dir.is_dir():
      raise DataError(f"split folder does not exist: {split_dir} "
                      f"(splits found: {', '.join(self.split_names)})")
    files, labels = [], []
    class_dirs = _subdirectories(split_dir)
    if not class_dirs:
      raise DataError(f"split folder has no class folders: {split_dir}")
    for class_name in class_dirs:
      class_dir = split_dir / class_name
      images = sorted(entry.name for entry in class_dir.iterdir()
                      if entry.name.lower().endswith(IMAGE_EXTENSIONS))
      if not images:
        raise DataError(f"empty class folder (no {'/'.join(IMAGE_EXTENSIONS)} files): "
                        f"{class_dir}")
      files.extend(os.fspath(class_dir / name) for name in images)
      labels.extend([self.class_names.index(class_name)] * len(images))
    self._listing[split] = (files, np.asarray(labels, np.int32))
    return self._listing[split]

  def num_examples(self, split):
    # Counts files without decoding; corrupt files skipped at preparation are not subtracted.
    sizes = lambda name: len(self.list_split(name)[0])
    return sum(stop - start for _, start, stop in slice_indices(split, sizes))

  def load(self, split, cache):
    parts = []
    sizes = lambda name: self.prepare(name, cache).num_examples
    for name, start, stop in slice_indices(split, sizes):
      prepared = self.prepare(name, cache)
      if isinstance(prepared, ArraySplit):
        parts.append(ArraySplit(prepared.images[start:stop], prepared.labels[start:stop]))
      else:
        parts.append(FileSplit(prepared.files[start:stop], prepared.labels[start:stop],
                               self.decoder))
    if sum(part.num_examples for part in parts) == 0:
      raise DataError(f"split {split!r} of {self.description} has no images")
    if len(parts) == 1:
      return parts[0]
    if all(isinstance(part, ArraySplit) for part in parts):
      same_shape = len({part.images.shape[1:] for part in parts}) == 1
      if same_shape:
        return ArraySplit(np.concatenate([part.images for part in parts]),
                          np.concatenate([part.labels for part in parts]))
    files, labels = [], []
    for name, start, stop in slice_indices(split, sizes):
      prepared = self.prepare(name, cache=False)
      files.extend(prepared.files[start:stop])
      labels.append(prepared.labels[start:stop])
    return FileSplit(files, np.concatenate(labels), self.decoder)

  def prepare(self, split, cache):
    """Validates (decodes) every image of a split once; caches uint8 arrays when possible.

    The result is stored under data_dir keyed by the folder, the split and the listing (names,
    sizes, modification times), so a changed folder is prepared again.
    """
    key = (split, bool(cache))
    if key in self._prepared:
      return self._prepared[key]
    files, labels = self.list_split(split)
    cache_dir = self._cache_dir(split, files)
    meta_path = cache_dir / "meta.json"
    images_path = cache_dir / "images.npy"
    if not meta_path.exists() or (cache and self._is_fixed(meta_path)
                                  and not images_path.exists()):
      self._decode_and_store(split, files, labels, cache_dir, keep_arrays=cache)
    meta = json.loads(meta_path.read_text())
    if meta["skipped"]:
      log.warning("%s split %r: skipped %d undecodable image(s) (data.skip_corrupt=True), "
                  "e.g. %s", self.description, split, len(meta["skipped"]), meta["skipped"][0])
    skipped = set(meta["skipped"])
    kept = np.asarray([index for index in range(len(files)) if files[index] not in skipped],
                      np.int64)
    if cache and meta["fixed_shape"] is not None:
      with images_path.open("rb") as f:
        result = ArraySplit(np.load(f), labels[kept])
    else:
      result = FileSplit([files[index] for index in kept], labels[kept], self.decoder)
    self.skipped_files[split] = meta["skipped"]
    self._prepared[key] = result
    return result

  @staticmethod
  def _is_fixed(meta_path):
    return json.loads(meta_path.read_text())["fixed_shape"] is not None

  def _cache_dir(self, split, files):
    digest = hashlib.sha1()
    digest.update(f"{self.root}\0{split}\0{self.skip_corrupt}\0".encode())
    # One stat per file: on gs:// each is a request, so they run in parallel.
    with concurrent.futures.ThreadPoolExecutor(_io_threads()) as pool:
      for path, signature in zip(files, pool.map(_file_signature, files, chunksize=64)):
        digest.update(f"{path}\0{signature}\n".encode())
    name = f"{self.root.name}_{split}_{digest.hexdigest()[:16]}"
    return self.data_dir / "sjmae_folder_cache" / name

  def _decode_and_store(self, split, files, labels, cache_dir, keep_arrays):
    log.info("Preparing %s split %r: decoding %d images", self.description, split, len(files))
    skipped = []
    shapes = set()
    arrays = [None] * len(files) if keep_arrays else None
    with concurrent.futures.ThreadPoolExecutor(_io_threads()) as pool:
      decoded = pool.map(_decode_file, files, [self.decoder] * len(files), chunksize=64)
      for index, (array, error) in enumerate(decoded):
        if arrays is not None and array is not None and array.nbytes * len(files) > (
            self.cache_max_bytes):
          log.warning("%s split %r: decoded images would exceed data.cache_max_gb; they are "
                      "decoded every step instead", self.description, split)
          arrays = None
        if error is not None:
          if not self.skip_corrupt:
            raise DataError(f"cannot decode image {files[index]}: {error} "
                            "(set data.skip_corrupt=True to skip such files)")
          skipped.append(files[index])
          continue
        shapes.add(array.shape)
        if arrays is not None and len(shapes) == 1:
          arrays[index] = array
        else:
          arrays = None  # mixed sizes: images are decoded every step instead
    if len(skipped) == len(files):
      raise DataError(f"split {split!r} of {self.description} has no decodable images")
    fixed_shape = list(shapes.pop()) if len(shapes) == 1 else None
    cache_dir.mkdir(parents=True, exist_ok=True)
    if arrays is not None and fixed_shape is not None:
      stacked = np.stack([array for array in arrays if array is not None])
      _atomic_write(cache_dir / "images.npy", lambda f: np.save(f, stacked))
    meta = dict(root=os.fspath(self.root), split=split, num_files=len(files), skipped=skipped,
                fixed_shape=fixed_shape)
    _atomic_write(cache_dir / "meta.json", lambda f: f.write(json.dumps(meta).encode()))


# ---------------------------------------------------------------------------------------------
# ArrayRecord shards written by `python -m sjmae_jax.data.prepare` (see prepare.py).


@dataclasses.dataclass
class ShardSplit:
  """Records of prepared shards, read by index and decoded at every read."""
  source: object  # grain / array_record ArrayRecordDataSource over the split's shards
  start: int  # the split expression's slice of it
  stop: int
  description: str
  decoder: str = "pil"

  @property
  def num_examples(self):
    return self.stop - self.start

  def read(self, index):
    label, name, encoded = decode_record(self.source[self.start + int(index)])
    try:
      image = decode_image(encoded, self.decoder)
    except Exception as error:  # PIL raises many types for bad data  # pylint: disable=broad-except
      raise DataError(f"cannot decode image {name} of {self.description}: "
                      f"{_first_line(error)}") from None
    return image, label


class ArrayRecordSource:
  """arrayrecord:DIR, a directory written by `python -m sjmae_jax.data.prepare`."""

  def __init__(self, cfg, directory):
    self.directory = _absolute(directory)
    self.description = f"ArrayRecord shards {self.directory}"
    self.decoder = resolve_decoder(cfg.decoder)
    if not self.directory.is_dir():
      raise DataError(f"ArrayRecord directory does not exist: {self.directory} "
                      f"(data.source=arrayrecord:{directory})")
    self.index = read_index(self.directory)
    self.class_names = list(self.index["class_names"])
    self.num_classes = len(self.class_names)
    self._sources = {}

  def _named(self, name):
    splits = self.index["splits"]
    if name not in splits:
      raise DataError(f"{self.description}: no split {name!r} (splits: {', '.join(splits)})")
    return splits[name]

  def num_examples(self, split):
    sizes = lambda name: self._named(name)["num_examples"]
    return sum(stop - start for _, start, stop in slice_indices(split, sizes))

  def _records(self, name):
    if name not in self._sources:
      # pylint: disable-next=import-outside-toplevel
      from array_record.python import array_record_data_source
      entry = self._named(name)
      # File instructions carry the counts of the index: no file is opened until it is read.
      instructions = [_FileInstruction(os.fspath(self.directory / name / shard), 0, count, count)
                      for shard, count in zip(entry["shards"], entry["counts"]) if count]
      self._sources[name] = array_record_data_source.ArrayRecordDataSource(instructions)
    return self._sources[name]

  def load(self, split, cache):
    del cache  # shards are for data too large to hold decoded; read by index
    sizes = lambda name: self._named(name)["num_examples"]
    parts = [ShardSplit(self._records(name), start, stop, self.description, self.decoder)
             for name, start, stop in slice_indices(split, sizes) if stop > start]
    if not parts:
      raise DataError(f"split {split!r} of {self.description} has no examples")
    if len(parts) > 1:
      raise DataError(f"split {split!r} of {self.description}: one split (or slice of one) at a "
                      "time for ArrayRecord shards")
    return parts[0]


@dataclasses.dataclass
class _FileInstruction:  # array_record's FileInstruction protocol
  filename: str
  skip: int
  take: int
  examples_in_shard: int


def _io_threads():
  return max(2, os.cpu_count() or 2)


def _subdirectories(path):
  """Sorted names of the folders in `path`, hidden ones (.ipynb_checkpoints, ...) left out."""
  return sorted(entry.name for entry in path.iterdir()
                if not entry.name.startswith(".") and entry.is_dir())


def _decode_file(path, decoder="pil"):
  """(uint8 [H, W, 3] image, None) or (None, one-line reason)."""
  try:
    encoded = epath.Path(path).read_bytes()
  except OSError as error:
    return None, f"{type(error).__name__}: {error}"
  try:
    return decode_image(encoded, decoder), None
  except Exception as error:  # PIL raises many types for bad files  # pylint: disable=broad-except
    return None, _first_line(error)


def _atomic_write(path, write):
  """write(binary file) into a temporary file beside `path`, then rename it to `path`."""
  temp = path.parent / f"{path.name}.tmp{os.getpid()}"
  with temp.open("wb") as f:
    write(f)
  temp.replace(path)


# ---------------------------------------------------------------------------------------------


def open_source(cfg):
  source = cfg.source
  if source == "digits":
    return DigitsSource(cfg)
  if source.startswith("tfds:"):
    name = source[len("tfds:"):]
    if name in ("digits", digits.DIGITS_NAME):
      return DigitsSource(cfg)
    return _tfds_source(cfg, name)
  if source.startswith("folder:"):
    return FolderSource(cfg, source[len("folder:"):])
  if source.startswith("arrayrecord:"):
    return ArrayRecordSource(cfg, source[len("arrayrecord:"):])
  raise DataError(f"unknown data.source {source!r} (expected 'digits', 'tfds:NAME', "
                  "'folder:PATH' or 'arrayrecord:DIR')")
