"""Everything that takes a user's path works on gs:// paths: no local-path (os.path) assumption.

The gs:// bucket here lives in memory: with EPATH_USE_TF=false etils.epath sends gs:// paths to
fsspec, where the 'gs' protocol is fsspec's in-memory file system. Code that goes through epath
reads and writes the bucket; code that used os.path / open() on 'gs://bucket/...' would find
nothing, or write to ./gs:/bucket/... in the working directory, which every test checks is absent.
Orbax's own array writes go to GCS through TensorStore's gcs driver, which this cannot reach: the
checkpoint directory itself is not tested here (only config.json beside it).
"""
import io
import json

import fsspec
import jax
import numpy as np
import pytest
from etils import epath
from fsspec.implementations.memory import MemoryFileSystem
from PIL import Image

from sjmae_jax import checkpointing, data, export, interop, optim, trainer
from sjmae_jax.interop.io import read_state_dict, save_state_dict, sidecar_path
from tests.helpers import tiny_config


class InMemoryGcs(MemoryFileSystem):
  """fsspec's in-memory file system answering gs:// paths ('gs://b/x' is stored as '/b/x')."""
  protocol = ("gs", "gcs")
  store = {}
  pseudo_dirs = [""]

  @classmethod
  def _strip_protocol(cls, path):
    path = fsspec.utils.stringify_path(path)
    if "://" in path:
      path = path.split("://", 1)[1]
    path = path.strip("/")
    return "/" + path if path else ""


@pytest.fixture
def bucket(monkeypatch, tmp_path):
  monkeypatch.setenv("EPATH_USE_TF", "false")  # epath: gs:// through fsspec instead of tf.io.gfile
  # etils caches its "is TF installed" answer (env var included) on first use of any gs:// path;
  # an earlier test in the same process may have cached True.
  from etils.epath import gpath
  gpath._is_tf_installed.cache_clear()
  for protocol in InMemoryGcs.protocol:
    fsspec.register_implementation(protocol, InMemoryGcs, clobber=True)
  InMemoryGcs.store.clear()
  InMemoryGcs.pseudo_dirs[:] = [""]
  monkeypatch.chdir(tmp_path)
  yield epath.Path("gs://bucket")
  assert not (tmp_path / "gs:").exists(), "something wrote gs:// paths through the local file system"
  InMemoryGcs.store.clear()
  monkeypatch.undo()
  gpath._is_tf_installed.cache_clear()


def stored_files(prefix=""):
  return sorted(key for key in InMemoryGcs.store if key.startswith(prefix))


def write_png_folder(root: epath.Path, splits: dict) -> None:
  """ROOT/<split>/<class>/<i>.png of 8x8 images, each one colour (R = a global running id)."""
  image_id = 0
  for split, classes in splits.items():
    for class_name, count in classes.items():
      class_dir = root / split / class_name
      class_dir.mkdir(parents=True, exist_ok=True)
      for i in range(count):
        encoded = io.BytesIO()
        Image.fromarray(np.full((8, 8, 3), (image_id, 0, 77), np.uint8)).save(encoded, "png")
        (class_dir / f"{i:03d}.png").write_bytes(encoded.getvalue())
        image_id += 1


def folder_config(root, data_dir, **overrides):
  cfg = data.default_config()
  cfg.source = f"folder:{root}"
  cfg.data_dir = str(data_dir)
  cfg.img_size = 8
  cfg.views = ["eval"]
  cfg.eval_crop_fraction = 1.0
  cfg.normalize = "none"
  for key, value in overrides.items():
    setattr(cfg, key, value)
  return cfg


def test_image_folder_and_its_prepared_cache_on_gs(bucket):
  write_png_folder(bucket / "images", {"train": {"cat": 3, "dog": 5}, "test": {"cat": 1, "dog": 1}})
  cfg = folder_config(bucket / "images", bucket / "tfds")

  info = data.dataset_info(cfg)
  assert info.class_names == ["cat", "dog"]
  assert info.num_examples("train") == 8
  pipeline = data.build_train_pipeline(cfg, global_batch_size=8, seed=0, process_index=0,
                                       process_count=1)
  batch = next(iter(pipeline))
  assert batch["images"].shape == (8, 1, 8, 8, 3)
  red_ids = np.round(batch["images"][:, 0, 0, 0, 0] * 255).astype(int)
  assert sorted(red_ids) == list(range(8))  # every training image, decoded from the bucket
  np.testing.assert_array_equal(np.sort(batch["label"]), [0, 0, 0, 1, 1, 1, 1, 1])

  cache = stored_files("/bucket/tfds/sjmae_folder_cache/")
  assert [key.rsplit("/", 1)[1] for key in cache] == ["images.npy", "meta.json"]
  meta = json.loads(epath.Path("gs:/" + cache[1]).read_text())
  assert meta["root"] == "gs://bucket/images" and meta["num_files"] == 8

  # The next run reads the prepared arrays from the bucket instead of decoding the files again:
  # a file made undecodable (same name and size, so the same cache key) goes unnoticed.
  victim = bucket / "images" / "train" / "cat" / "000.png"
  victim.write_bytes(b"\0" * len(victim.read_bytes()))
  again = next(iter(data.build_train_pipeline(cfg, global_batch_size=8, seed=0, process_index=0,
                                              process_count=1)))
  np.testing.assert_array_equal(again["images"], batch["images"])


def test_uncached_image_folder_lists_gs_files_for_the_input_pipeline(bucket):
  write_png_folder(bucket / "images", {"train": {"a": 2, "b": 2}})
  source = data.sources.open_source(folder_config(bucket / "images", bucket / "tfds", cache=False))
  split = source.load("train", cache=False)
  assert isinstance(split, data.sources.FileSplit)
  assert split.files == [f"gs://bucket/images/train/{c}/{i:03d}.png" for c in "ab" for i in range(2)]
  assert any(key.endswith("/meta.json") for key in stored_files("/bucket/tfds/"))


def test_missing_gs_folder_is_a_data_error(bucket):
  with pytest.raises(data.DataError, match="image folder does not exist: gs://bucket/nothing"):
    data.dataset_info(folder_config(bucket / "nothing", bucket / "tfds"))


def test_state_dicts_and_their_sidecar_round_trip_on_gs(bucket):
  import ml_dtypes
  import torch
  state_dict = {"a.weight": np.arange(6, dtype=np.float32).reshape(2, 3),
                "b.bias": np.array([1.5, -2.0], dtype=ml_dtypes.bfloat16)}
  path = bucket / "weights" / "model.safetensors"
  path.parent.mkdir(parents=True)
  save_state_dict(state_dict, path, info={"format": "timm", "timm_name": "x"})
  assert sidecar_path(path) == "gs://bucket/weights/model.json"
  assert json.loads(epath.Path(sidecar_path(path)).read_text())["timm_name"] == "x"
  loaded = read_state_dict(str(path))
  np.testing.assert_array_equal(loaded["a.weight"], state_dict["a.weight"])
  np.testing.assert_array_equal(loaded["b.bias"], [1.5, -2.0])

  pickled = io.BytesIO()
  torch.save({"model": {"module.w": torch.ones(2, 2)}}, pickled)
  (bucket / "weights" / "mae.pth").write_bytes(pickled.getvalue())
  np.testing.assert_array_equal(read_state_dict(bucket / "weights" / "mae.pth")["w"], np.ones((2, 2)))

  with pytest.raises(FileNotFoundError, match="gs://bucket/weights/absent.safetensors"):
    read_state_dict("gs://bucket/weights/absent.safetensors")


def test_export_writes_to_gs(bucket, tmp_path):
  config = tiny_config("mae")
  tx, _ = optim.make_optimizer(config, 10)
  state = trainer.init_state(trainer.build_model(config), tx, config, jax.random.PRNGKey(0))
  run = tmp_path / "run"
  checkpointing.write_config(run, config)
  checkpointer = checkpointing.Checkpointer(run, async_save=False)
  checkpointer.save(1, state, force=True)
  checkpointer.close()

  out = "gs://bucket/exports/new/encoder.safetensors"  # its folder does not exist yet
  assert export.main(["--workdir", str(run), "--out", out]) == 0
  written = read_state_dict(out)
  expected = interop.timm.encoder_to_timm(jax.device_get(state["params"]["encoder"]), num_heads=2)
  assert sorted(written) == sorted(expected)
  for key, value in expected.items():
    np.testing.assert_array_equal(written[key], value)
  assert json.loads(epath.Path(sidecar_path(out)).read_text())["format"] == "timm"


def test_run_config_round_trips_in_a_gs_workdir(bucket):
  config = tiny_config("mae")
  checkpointing.write_config("gs://bucket/runs/mae", config)
  assert stored_files("/bucket/runs/mae/") == ["/bucket/runs/mae/config.json"]
  assert checkpointing.read_config("gs://bucket/runs/mae").model.embed_dim == config.model.embed_dim


def test_tokenizer_files_round_trip_on_gs(bucket):
  from sjmae_jax.models.vit import VisionTransformer
  from sjmae_jax.tokenizers import tokenizer
  teacher_kwargs = dict(img_size=8, patch_size=4, in_chans=3, embed_dim=16, depth=1, num_heads=2)
  params = VisionTransformer(**teacher_kwargs).init(jax.random.PRNGKey(0), np.zeros((1, 8, 8, 3)))["params"]
  codebook = np.arange(5 * 16, dtype=np.float32).reshape(5, 16)
  path = bucket / "tokenizers" / "k5.npy"
  tokenizer.save_tokenizer(path, codebook, teacher_kwargs, params,
                           teacher_norm=tokenizer.NORMALIZATIONS["imagenet"])
  assert stored_files("/bucket/tokenizers") == [
      "/bucket/tokenizers/k5.json", "/bucket/tokenizers/k5.npy",
      "/bucket/tokenizers/k5.teacher.safetensors"]
  found = tokenizer.read_tokenizer("gs://bucket/tokenizers/k5.npy")
  assert (found.codebook_path, found.teacher_path) == (
      "gs://bucket/tokenizers/k5.npy", "gs://bucket/tokenizers/k5.teacher.safetensors")
  arrays = found.load_arrays()
  np.testing.assert_array_equal(arrays["codebook"], codebook)
  jax.tree.map(np.testing.assert_array_equal, arrays["encoder"], jax.device_get(params))


def test_tensorboard_event_files_go_to_gs(bucket):
  from sjmae_jax import metric_writers
  writer = metric_writers.create_default_writer(bucket / "run" / "tensorboard")
  writer.write_scalars(1, {"loss": 2.0})
  writer.flush()
  (event_file,) = stored_files("/bucket/run/tensorboard/")
  assert "events.out.tfevents" in event_file
  flushed = len(InMemoryGcs.store[event_file].getvalue())
  writer.write_scalars(2, {"loss": 1.0})
  writer.close()
  assert len(InMemoryGcs.store[event_file].getvalue()) > flushed  # rewritten with the new event
