"""sjmae_jax.metric_writers: scalars, pictures and hyperparameters reach TensorBoard event files
without TensorFlow. The files are read back with tensorboard's own record reader and protos."""
import io
import logging

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
from tensorboard.compat.proto import event_pb2
from tensorboard.plugins.hparams import plugin_data_pb2

from sjmae_jax import metric_writers

pytestmark = pytest.mark.no_tf


def summary_values(logdir):
  """[(step, tag, Summary.Value)] of every event file in `logdir`, in file order."""
  values = []
  for path in sorted(logdir.glob("events.out.tfevents.*")):
    for record in RawEventFileLoader(str(path)).Load():
      event = event_pb2.Event.FromString(record)
      values += [(event.step, value.tag, value) for value in event.summary.value]
  return values


def test_scalars_images_and_hparams_reach_one_event_file(tmp_path):
  writer = metric_writers.create_default_writer(tmp_path / "tensorboard")
  writer.write_hparams({"lr": 0.1, "method": "sjmae", "epochs": 3, "views": ("simclr", "simclr")})
  writer.write_scalars(3, {"loss": 1.5, "knn/top1": np.float32(0.25)})
  writer.write_scalars(7, {"loss": 0.5})
  pictures = np.random.default_rng(0).random((4, 8, 6, 3)).astype(np.float32)
  pictures[0, 0, 0] = (1.7, -0.3, 0.5)  # out of [0, 1]: clipped, not wrapped
  writer.write_images(7, {"reconstruction": pictures})
  writer.flush()
  assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 1  # one run
  values = summary_values(tmp_path / "tensorboard")

  scalars = [(step, tag, value.simple_value) for step, tag, value in values
             if value.HasField("simple_value")]
  assert scalars == [(3, "loss", 1.5), (3, "knn/top1", 0.25), (7, "loss", 0.5)]

  (step, _, image), = [entry for entry in values if entry[1] == "reconstruction"]
  decoded = np.asarray(Image.open(io.BytesIO(image.image.encoded_image_string)))[..., :3]
  assert step == 7 and decoded.shape == (8, 4 * 6, 3)  # the four pictures side by side
  expected = np.concatenate(list(np.clip(pictures, 0.0, 1.0)), axis=1) * 255.0
  assert np.abs(decoded - expected).max() <= 1.0

  hparams = {tag: value for _, tag, value in values if tag.startswith("_hparams_/")}
  assert hparams["_hparams_/session_start_info"].metadata.plugin_data.plugin_name == "hparams"
  start = plugin_data_pb2.HParamsPluginData.FromString(
      hparams["_hparams_/session_start_info"].metadata.plugin_data.content).session_start_info
  assert start.hparams["lr"].number_value == 0.1 and start.hparams["epochs"].number_value == 3
  assert start.hparams["method"].string_value == "sjmae"
  assert start.hparams["views"].string_value == "('simclr', 'simclr')"


def test_just_logging_writes_no_event_file_and_logs_every_value(tmp_path, caplog):
  writer = metric_writers.create_default_writer(tmp_path / "tensorboard", just_logging=True)
  with caplog.at_level(logging.INFO):
    writer.write_scalars(5, {"loss": 0.123456789, "step_count": 2})
    writer.write_images(5, {"pictures": np.zeros((2, 4, 4, 3))})
    writer.flush()
    writer.close()
  assert not (tmp_path / "tensorboard").exists()
  assert "[5] loss=0.123457, step_count=2" in caplog.text
  assert "(2, 4, 4, 3)" in caplog.text
