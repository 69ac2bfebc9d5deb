"""Metric writers: the log, and TensorBoard event files written without TensorFlow.

The interface is clu.metric_writers' (write_scalars / write_images / write_hparams / flush /
close), whose package imports TensorFlow when loaded; event files come from tensorboardX, which
needs only NumPy and protobuf. `tensorboard --logdir WORKDIR/tensorboard` reads them as before.

    writer = metric_writers.create_default_writer(workdir / "tensorboard", just_logging=not is_main)
    writer.write_scalars(step, {"loss": 0.5})
    writer.write_images(step, {"reconstruction": images})  # float [N, H, W, C] in [0, 1] or uint8
"""
import io
import os
import time

import numpy as np
from absl import logging
from etils import epath


class LoggingWriter:
  """Every value to the INFO log (clu's format: '[step] key=value, ...')."""

  def write_scalars(self, step: int, scalars) -> None:
    values = [f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}"
              for k, v in sorted(scalars.items())]
    logging.info("[%d] %s", step, ", ".join(values))

  def write_images(self, step: int, images) -> None:
    logging.info("[%d] Got images: %s.", step, {k: np.shape(v) for k, v in images.items()})

  def write_hparams(self, hparams) -> None:
    logging.info("Hyperparameters: %s", dict(hparams))

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


def _as_hparam(value):
  """TensorBoard's hparams plugin takes bool / int / float / str values."""
  if isinstance(value, (bool, int, float, str)):
    return value
  if isinstance(value, np.generic):
    return value.item()
  return str(value)


class _ObjectStoreEventFile:
  """An event file at a URI (gs://...) through etils.epath, like every other path here (TF's
  gfile when TensorFlow is installed, else fsspec). Object stores cannot append: each flush
  rewrites the whole file."""

  def __init__(self, path):
    self.path = epath.Path(path)
    self.buffer = io.BytesIO()

  def write(self, data):
    self.buffer.write(data)

  def flush(self):
    self.path.write_bytes(self.buffer.getvalue())

  def close(self):
    self.flush()


class _ObjectStoreFactory:

  def open(self, path):
    return _ObjectStoreEventFile(path)

  def directory_check(self, path):
    epath.Path(path).mkdir(parents=True, exist_ok=True)


class TensorBoardWriter:
  """Scalars, images and hyperparameters as TensorBoard events in one event file in `logdir`.

  Summaries are made by tensorboardX and written synchronously with its EventsWriter (its
  SummaryWriter queues events for a thread, so flush() would not mean written).
  """

  def __init__(self, logdir):
    # pylint: disable=import-outside-toplevel
    from tensorboardX import event_file_writer, record_writer, summary
    from tensorboardX.proto import event_pb2
    # pylint: enable=import-outside-toplevel
    self._summary, self._event = summary, event_pb2.Event
    logdir = os.fspath(logdir)
    if "://" in logdir:  # instead of tensorboardX's own gs:// / s3:// clients
      record_writer.register_writer_factory(logdir.split("://")[0], _ObjectStoreFactory())
    record_writer.directory_check(logdir)
    self._events = event_file_writer.EventsWriter(os.path.join(logdir, "events"))

  def _write(self, summary, step=0) -> None:
    self._events.write_event(self._event(wall_time=time.time(), step=int(step), summary=summary))

  def write_scalars(self, step: int, scalars) -> None:
    for key, value in scalars.items():
      self._write(self._summary.scalar(key, float(value)), step)

  def write_images(self, step: int, images) -> None:
    """{key: [N, H, W, C] or [H, W, C]}: float in [0, 1] (clipped) or uint8; C = 1 or 3.
    A batch of images is written as one grid."""
    for key, value in images.items():
      value = np.asarray(value)
      value = (np.clip(value.astype(np.float32), 0.0, 1.0) if value.dtype != np.uint8
               else value.astype(np.float32) / 255.0)
      dataformats = "HWC" if value.ndim == 3 else "NHWC"
      self._write(self._summary.image(key, value, dataformats=dataformats), step)

  def write_hparams(self, hparams) -> None:
    for summary in self._summary.hparams({k: _as_hparam(v) for k, v in hparams.items()}, {}):
      self._write(summary)

  def flush(self) -> None:
    self._events.flush()

  def close(self) -> None:
    self._events.close()


class MultiWriter:
  """Writes to each of `writers`."""

  def __init__(self, writers):
    self.writers = list(writers)

  def write_scalars(self, step: int, scalars) -> None:
    for writer in self.writers:
      writer.write_scalars(step, scalars)

  def write_images(self, step: int, images) -> None:
    for writer in self.writers:
      writer.write_images(step, images)

  def write_hparams(self, hparams) -> None:
    for writer in self.writers:
      writer.write_hparams(hparams)

  def flush(self) -> None:
    for writer in self.writers:
      writer.flush()

  def close(self) -> None:
    for writer in self.writers:
      writer.close()


def import_backend() -> None:
  """Imports tensorboardX now (it imports torch where that is installed: seconds), so that the
  first write of a lazily created writer does not stall a timed training loop."""
  # pylint: disable=import-outside-toplevel,unused-import
  from tensorboardX import event_file_writer, summary  # noqa: F401


def create_default_writer(logdir=None, *, just_logging: bool = False) -> MultiWriter:
  """The log, plus TensorBoard event files in `logdir` unless `just_logging` (other processes
  than the first of a multi-process run)."""
  writers = [LoggingWriter()]
  if not just_logging and logdir is not None:
    writers.append(TensorBoardWriter(logdir))
  return MultiWriter(writers)
