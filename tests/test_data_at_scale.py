"""The input pipeline at ImageNet scale: JPEG decoders, Grain worker processes (same batches as
threads, exact resume, one-line failures) and ArrayRecord shards made by `data.prepare`.
Small generated JPEG folders; nothing is downloaded; no TensorFlow."""

import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sjmae_jax import data
from sjmae_jax.data import augment_host, records
from tests.helpers import assert_batches_equal, take

pytestmark = pytest.mark.no_tf
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def photo_like(rng, height, width):
  """Smooth colour gradients plus noise: compresses like a photo, differs per seed."""
  y, x = np.mgrid[0:height, 0:width] / max(height, width)
  channels = [np.sin(rng.uniform(1, 9) * x + rng.uniform(1, 9) * y + rng.uniform(0, 6))
              for _ in range(3)]
  image = (np.stack(channels, -1) + 1) * 100 + rng.normal(0, 12, (height, width, 3))
  return np.clip(image, 0, 255).astype(np.uint8)


def write_jpeg_folder(root, per_class=6, classes=("a", "b"), sizes=((30, 40), (41, 27))):
  """ROOT/train/<class>/<i>.jpg of mixed sizes (so they are decoded at every read)."""
  rng = np.random.default_rng(0)
  for class_name in classes:
    os.makedirs(os.path.join(root, "train", class_name))
    for i in range(per_class):
      height, width = sizes[i % len(sizes)]
      Image.fromarray(photo_like(rng, height, width)).save(
          os.path.join(root, "train", class_name, f"{i:03d}.jpg"), quality=90)
  return root


def folder_config(root, cache_dir, **overrides):
  cfg = data.default_config()
  cfg.source = f"folder:{root}"
  cfg.data_dir = str(cache_dir)
  cfg.img_size = 16
  cfg.cache = False
  cfg.augment_on_device = True  # pre-batches: uint8 crops, compared bit for bit
  for key, value in overrides.items():
    setattr(cfg, key, value)
  return cfg


def one_line_error(function, *args, **kwargs):
  with pytest.raises(data.DataError) as error:
    function(*args, **kwargs)
  message = str(error.value)
  assert "\n" not in message
  return message


# ---------------------------------------------------------------------------------------------
# Decoders.


def encoded(image, fmt="JPEG", **options):
  buffer = io.BytesIO()
  image.save(buffer, fmt, **options)
  return buffer.getvalue()


def test_simplejpeg_decodes_the_same_pixels_as_pil_and_leaves_the_rest_to_pil():
  pytest.importorskip("simplejpeg")
  rgb = Image.fromarray(photo_like(np.random.default_rng(1), 37, 53))
  cases = {
      "4:2:0": encoded(rgb, quality=90),
      "4:4:4": encoded(rgb, quality=95, subsampling=0),
      "4:2:2": encoded(rgb, quality=80, subsampling=1),
      "progressive": encoded(rgb, quality=90, progressive=True),
      "gray": encoded(rgb.convert("L"), quality=90),
      "cmyk": encoded(rgb.convert("CMYK"), quality=90),  # libjpeg-turbo alone gets it wrong
      "png": encoded(rgb.convert("RGBA"), "PNG"),
  }
  for name, blob in cases.items():
    reference = augment_host.decode_image(blob, "pil")
    assert reference.shape == (37, 53, 3) and reference.dtype == np.uint8, name
    np.testing.assert_array_equal(augment_host.decode_image(blob, "simplejpeg"), reference,
                                  err_msg=name)
  assert augment_host.resolve_decoder("auto") == "simplejpeg"


def test_decoders_give_identical_batches_and_bad_names_fail_in_one_line(tmp_path, monkeypatch):
  pytest.importorskip("simplejpeg")
  root = write_jpeg_folder(str(tmp_path / "jpegs"))
  batches = {}
  for decoder in ("pil", "simplejpeg"):
    cfg = folder_config(root, tmp_path / "cache", decoder=decoder, views=["simclr", "mae"],
                        num_workers=0)
    batches[decoder] = take(data.build_train_pipeline(cfg, global_batch_size=4, seed=0,
                                                      process_index=0, process_count=1), 3)
  assert_batches_equal(batches["pil"], batches["simplejpeg"])

  cfg = folder_config(root, tmp_path / "cache", decoder="turbo")
  assert "data.decoder='turbo'" in one_line_error(data.dataset_info, cfg)
  monkeypatch.setitem(sys.modules, "simplejpeg", None)  # as if not installed
  cfg.decoder = "simplejpeg"
  assert "pip install simplejpeg" in one_line_error(data.dataset_info, cfg)
  assert augment_host.resolve_decoder("auto") == "pil"


# ---------------------------------------------------------------------------------------------
# Resizing the crops (data.resize).


def natural_size_specs(image, count=24, seed=0):
  """The RandomResizedCrop specs of the mae recipe (mostly shrinking a 500 x 375 photo to 224,
  some enlarging) and the eval recipe's resize + center crop, at 224 px."""
  cfg = data.default_config()
  height, width = image.shape[:2]
  uniforms = augment_host.draw_uniforms((seed,), (count,))
  return np.concatenate([
      augment_host.crop_specs(uniforms, height, width, cfg.recipes.mae, 224, 0.875),
      augment_host.crop_specs(uniforms[:1], height, width, cfg.recipes.eval, 224, 0.875)])


def test_pil_resize_is_pil_crop_then_resize_bit_for_bit():
  """crop_one cuts the box out as an array view; PIL's own crop + resize (torchvision's
  resized_crop on a PIL image) gives the same bits, also for a pad-crop beyond the image."""
  image = photo_like(np.random.default_rng(3), 375, 500)
  specs = natural_size_specs(image)
  pad_crop = data.default_config().recipes.mae.copy_and_resolve_references()
  pad_crop.crop, pad_crop.pad = "pad_crop", 4
  specs = np.concatenate([specs, augment_host.crop_specs(  # corners: windows beyond the image
      np.asarray([[0.0] * augment_host.NUM_UNIFORMS, [0.999] * augment_host.NUM_UNIFORMS],
                 np.float32), 30, 40, pad_crop, 24, 0.875)])
  for spec in specs:
    y0, y_len, y_total, y_off, x0, x_len, x_total, x_off = (int(v) for v in spec)
    source = image if y_total != 24 else image[:30, :40]
    size = 224 if y_total != 24 else 24
    for interpolation, resample in (("bicubic", Image.BICUBIC), ("bilinear", Image.BILINEAR)):
      expected = np.asarray(Image.fromarray(source).crop((x0, y0, x0 + x_len, y0 + y_len)).resize(
          (x_total, y_total), resample))[y_off:y_off + size, x_off:x_off + size]
      np.testing.assert_array_equal(
          augment_host.crop_one(source, spec, size, interpolation), expected, err_msg=str(spec))


def test_opencv_resize_is_close_to_pil_and_bad_names_fail_in_one_line(tmp_path, monkeypatch):
  pytest.importorskip("cv2")
  image = photo_like(np.random.default_rng(4), 375, 500)
  specs = natural_size_specs(image)
  assert (specs[:, 1] > 224).any() and (specs[:, 1] < 224).any()  # shrinking and enlarging
  for interpolation in ("bicubic", "bilinear"):
    pil = np.stack([augment_host.crop_one(image, spec, 224, interpolation) for spec in specs])
    opencv = np.stack([augment_host.crop_one(image, spec, 224, interpolation, "opencv")
                       for spec in specs])
    assert opencv.shape == pil.shape and opencv.dtype == np.uint8
    levels = np.abs(opencv.astype(np.int16) - pil.astype(np.int16))
    # Another filter, not another crop: about one level on average, a few at edges.
    assert levels.mean() < 1.5 and np.percentile(levels, 99) <= 10, (interpolation, levels.mean())
    assert not np.array_equal(opencv, pil)

  # Through the pipeline: the same crops (boxes, flips, order), resized by OpenCV.
  root = write_jpeg_folder(str(tmp_path / "jpegs"), sizes=((300, 400), (41, 27)))
  batches = {}
  for resize in ("pil", "opencv"):
    cfg = folder_config(root, tmp_path / "cache", resize=resize, num_workers=0)
    batches[resize] = take(data.build_train_pipeline(cfg, global_batch_size=4, seed=0,
                                                     process_index=0, process_count=1), 2)
  for pil, opencv in zip(batches["pil"], batches["opencv"]):
    np.testing.assert_array_equal(pil["label"], opencv["label"])
    levels = np.abs(pil["crops"].astype(np.int16) - opencv["crops"].astype(np.int16))
    assert 0 < levels.mean() < 3

  cfg = folder_config(root, tmp_path / "cache", resize="cv2")
  assert "data.resize='cv2'" in one_line_error(data.build_train_pipeline, cfg, 4, 0)
  monkeypatch.setitem(sys.modules, "cv2", None)  # as if not installed
  monkeypatch.setattr(augment_host, "_cv2", None)
  cfg.resize = "opencv"
  assert "pip install opencv-python-headless" in one_line_error(data.build_train_pipeline, cfg,
                                                                 4, 0)


# ---------------------------------------------------------------------------------------------
# Worker processes (data.num_workers).


def test_workers_give_the_batches_of_threads_and_resume_exactly_with_any_worker_count(tmp_path):
  root = write_jpeg_folder(str(tmp_path / "jpegs"))
  build = lambda workers, start=0: data.build_train_pipeline(
      folder_config(root, tmp_path / "cache", num_workers=workers, views=["simclr", "simclr"]),
      global_batch_size=4, seed=0, start_step=start, process_index=0, process_count=1)
  threads = build(0)
  assert threads.num_workers == 0
  expected = take(threads, 7)  # past the end of the first epoch (3 steps)
  workers = build(2)
  assert workers.num_workers == 2
  assert_batches_equal(take(workers, 7), expected)
  workers.close()
  resumed = build(1, start=4)  # a resume may use another worker count
  resumed.restore(json_round_trip(threads.checkpoint_state(4)))
  assert_batches_equal(take(resumed, 3), expected[4:])
  resumed.close()


def json_round_trip(value):
  import json
  return json.loads(json.dumps(value))


def test_workers_default_to_the_host_cores_and_bad_counts_fail_in_one_line(tmp_path,
                                                                           monkeypatch):
  from sjmae_jax.data import pipeline as pipeline_module
  root = write_jpeg_folder(str(tmp_path / "jpegs"))
  cfg = folder_config(root, tmp_path / "cache")
  assert cfg.num_workers == "auto"
  build = lambda: data.build_train_pipeline(cfg, global_batch_size=4, seed=0, process_index=0,
                                            process_count=1)
  assert build().num_workers == 0  # 12 images: not worth starting processes
  monkeypatch.setattr(pipeline_module, "AUTO_WORKERS_MIN_EXAMPLES", 12)
  assert build().num_workers == len(os.sched_getaffinity(0))  # nothing started until read
  cfg.cache = True  # one size: in memory, gathered in one batched step, no workers
  write_jpeg_folder(str(tmp_path / "same"), sizes=((12, 12),))
  cfg.source = f"folder:{tmp_path / 'same'}"
  assert data.build_train_pipeline(cfg, global_batch_size=4, seed=0, process_index=0,
                                   process_count=1).num_workers == 0
  for bad in (-1, "many", 1.5):
    cfg.num_workers = bad
    assert "data.num_workers" in one_line_error(
        data.build_train_pipeline, cfg, global_batch_size=4, seed=0, process_index=0,
        process_count=1)


def test_threads_default_to_two_per_core_and_change_no_batch(tmp_path, monkeypatch):
  from sjmae_jax.data import pipeline as pipeline_module
  root = write_jpeg_folder(str(tmp_path / "jpegs"))
  cfg = folder_config(root, tmp_path / "cache", num_workers=0)
  assert cfg.num_threads == "auto"
  for cores, threads in ((1, 2), (2, 4), (8, 16), (96, 16)):
    monkeypatch.setattr(pipeline_module, "host_cores", lambda cores=cores: cores)
    assert pipeline_module._read_options(cfg, 256).num_threads == threads
  batches = {}
  for count in ("auto", 1, "3"):  # "3": as --config.data.num_threads=3 gives it
    cfg.num_threads = count
    batches[count] = take(data.build_train_pipeline(cfg, global_batch_size=4, seed=0,
                                                    process_index=0, process_count=1), 3)
  assert_batches_equal(batches["auto"], batches[1])
  assert_batches_equal(batches["auto"], batches["3"])
  for bad in (-1, "many", 2.5):
    cfg.num_threads = bad
    assert "data.num_threads" in one_line_error(
        data.build_train_pipeline, cfg, global_batch_size=4, seed=0, process_index=0,
        process_count=1)


def test_a_corrupt_file_or_a_killed_worker_ends_the_run_in_one_line(tmp_path):
  root = write_jpeg_folder(str(tmp_path / "jpegs"))
  cfg = folder_config(root, tmp_path / "cache", num_workers=2)
  pipeline = data.build_train_pipeline(cfg, global_batch_size=4, seed=0, process_index=0,
                                       process_count=1)
  bad = os.path.join(root, "train", "b", "002.jpg")
  with open(bad, "wb") as f:  # damaged after the folder was listed and checked
    f.write(b"\xff\xd8\xff\xe0 not a jpeg any more")
  message = one_line_error(take, pipeline, 3)  # one epoch reads every file
  assert f"cannot decode image {bad}" in message
  pipeline.close()

  os.remove(bad)
  write_jpeg_folder(str(tmp_path / "fine"))
  cfg.source = f"folder:{tmp_path / 'fine'}"
  pipeline = data.build_train_pipeline(cfg, global_batch_size=4, seed=0, process_index=0,
                                       process_count=1)
  next(pipeline)
  import multiprocessing
  import signal
  victims = multiprocessing.active_children()
  assert len(victims) == 2
  for process in victims:  # as the kernel's OOM killer would
    os.kill(process.pid, signal.SIGKILL)
  message = one_line_error(take, pipeline, 10)
  assert "input worker process" in message and "killed by SIGKILL" in message
  pipeline.close()


# ---------------------------------------------------------------------------------------------
# ArrayRecord shards: python -m sjmae_jax.data.prepare.


def test_prepare_round_trips_a_folder_and_training_reads_the_same_batches(tmp_path):
  root = write_jpeg_folder(str(tmp_path / "jpegs"), per_class=5)
  write_jpeg_folder(str(tmp_path / "jpegs_test"), per_class=2, classes=("b",))
  os.rename(tmp_path / "jpegs_test" / "train", tmp_path / "jpegs" / "test")
  out = tmp_path / "shards"
  result = subprocess.run([sys.executable, "-m", "sjmae_jax.data.prepare", f"folder:{root}",
                           "--out", str(out), "--examples-per-shard", "4",
                           "--data-dir", str(tmp_path / "cache")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  index = records.read_index(out)
  assert index["class_names"] == ["a", "b"]
  assert index["splits"]["train"]["counts"] == [4, 4, 2]
  assert index["splits"]["test"]["num_examples"] == 2

  # Same files (bytes), labels and order as the folder source lists them.
  from array_record.python import array_record_data_source
  folder = data.build_train_pipeline(folder_config(root, tmp_path / "cache", num_workers=0),
                                     global_batch_size=5, seed=0, process_index=0,
                                     process_count=1)
  shards = data.build_train_pipeline(
      folder_config(root, tmp_path / "cache", num_workers=0, source=f"arrayrecord:{out}"),
      global_batch_size=5, seed=0, process_index=0, process_count=1)
  files, labels = folder.split_data.files, folder.split_data.labels
  shard_records = array_record_data_source.ArrayRecordDataSource(
      [str(out / "train" / name) for name in index["splits"]["train"]["shards"]])
  assert len(shard_records) == len(files) == shards.num_examples == 10
  for position, path in enumerate(files):
    label, name, encoded = records.decode_record(shard_records[position])
    assert (label, name) == (labels[position], os.path.relpath(path, root))
    with open(path, "rb") as f:
      assert encoded == f.read()
  assert_batches_equal(take(shards, 4), take(folder, 4))
  info = data.dataset_info(folder_config(root, tmp_path / "cache", source=f"arrayrecord:{out}",
                                         train_split="train[:50%]"))
  assert info.split_sizes == {"train[:50%]": 5, "test": 2} and info.class_names == ["a", "b"]


def test_prepare_resumes_after_a_kill_and_checks_counts(tmp_path):
  from sjmae_jax.data import prepare
  root = write_jpeg_folder(str(tmp_path / "jpegs"), per_class=5)
  out = tmp_path / "shards"
  written = []

  def killed_after_two(path, records):  # as if killed while writing the third shard
    if len(written) == 2:
      raise KeyboardInterrupt
    written.append(path.name)
    real_write(path, records)
  real_write = prepare._write_shard  # pylint: disable=protected-access
  prepare._write_shard = killed_after_two  # pylint: disable=protected-access
  try:
    with pytest.raises(KeyboardInterrupt):
      prepare.prepare(f"folder:{root}", out, data_dir=str(tmp_path / "cache"),
                      examples_per_shard=3, log=lambda line: None)
  finally:
    prepare._write_shard = real_write  # pylint: disable=protected-access
  assert not (out / records.INDEX_FILE).exists()  # incomplete: not readable
  assert "not prepared, or its preparation did not finish" in one_line_error(
      data.dataset_info, folder_config(root, tmp_path, source=f"arrayrecord:{out}"))
  first = (out / "train" / written[0]).stat().st_mtime_ns
  lines = []
  index = prepare.prepare(f"folder:{root}", out, data_dir=str(tmp_path / "cache"),
                          examples_per_shard=3, log=lines.append)
  assert "train: resuming after 2 complete shard(s)" in lines
  assert (out / "train" / written[0]).stat().st_mtime_ns == first  # kept, not rewritten
  assert index["splits"]["train"]["counts"] == [3, 3, 3, 1]

  # A shard that lost records is noticed and rewritten on the next run.
  shard = out / "train" / index["splits"]["train"]["shards"][1]
  prepare._write_shard(shard, [b"x"])  # pylint: disable=protected-access
  lines.clear()
  prepare.prepare(f"folder:{root}", out, data_dir=str(tmp_path / "cache"), examples_per_shard=3,
                  log=lines.append)
  assert "train: resuming after 1 complete shard(s)" in lines
  assert prepare._count_records(shard) == 3  # pylint: disable=protected-access


def test_prepare_names_a_corrupt_file_in_one_line_or_skips_it(tmp_path):
  root = write_jpeg_folder(str(tmp_path / "jpegs"), per_class=3)
  bad = os.path.join(root, "train", "a", "001.jpg")
  with open(bad, "wb") as f:
    f.write(b"\xff\xd8\xff\xe0 broken")
  run = lambda *flags: subprocess.run(
      [sys.executable, "-m", "sjmae_jax.data.prepare", f"folder:{root}", "--out",
       str(tmp_path / "shards"), "--data-dir", str(tmp_path / "cache"), *flags],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  result = run()
  assert result.returncode == 2 and "Traceback" not in result.stderr
  [line] = result.stderr.strip().splitlines()
  assert line.startswith("error: cannot decode image train/a/001.jpg: ")
  assert line.endswith("(--skip-corrupt leaves such files out)")
  assert run("--skip-corrupt").returncode == 0
  index = records.read_index(tmp_path / "shards")
  assert index["splits"]["train"]["skipped"] == ["train/a/001.jpg"]
  assert index["splits"]["train"]["num_examples"] == 5


# ---------------------------------------------------------------------------------------------
# train.py with workers: kill -9 mid-epoch, then the same command.


@pytest.mark.slow
def test_kill_9_mid_epoch_with_workers_then_resume_gives_identical_params(tmp_path):
  import psutil
  import jax
  from sjmae_jax import checkpointing
  from tests.helpers import run_train, start_train, wait_until
  root = write_jpeg_folder(str(tmp_path / "jpegs"), per_class=32, sizes=((20, 24), (18, 17)))
  overrides = {"data.source": f"folder:{root}", "data.data_dir": str(tmp_path / "cache"),
               "data.cache": False, "data.num_workers": 2, "data.eval_split": "train[:32]",
               "batch_size": 16, "epochs": 2, "warmup_epochs": 1,  # 8 steps, 4 per epoch
               "checkpoint.every_steps": 1, "checkpoint.keep": 2}
  # The uninterrupted run reads in threads: workers give the same batches.
  reference = run_train(tmp_path / "reference", overrides={**overrides, "data.num_workers": 0})
  assert reference.returncode == 0, reference.stderr[-3000:]

  workdir = tmp_path / "run"
  process = start_train(workdir, tmp_path / "log", overrides=overrides)
  try:
    checkpoints = workdir / "checkpoints"
    wait_until(lambda: checkpoints.exists() and any(
        p.name.isdigit() and 2 <= int(p.name) < 4 for p in checkpoints.iterdir()), process,
               what="a checkpoint in the first epoch")
    workers = psutil.Process(process.pid).children(recursive=True)
  finally:
    process.kill()  # SIGKILL: no cleanup of its own
    process.wait()
  assert workers  # the input worker processes, which end with it
  psutil.wait_procs([w for w in workers if w.is_running()], timeout=60)
  assert not [w for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]

  result = run_train(workdir, overrides=overrides)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "from step 0;" not in result.stdout  # it resumed
  assert "Exception ignored" not in result.stderr and "leaked" not in result.stderr
  for a, b in zip(jax.tree.leaves(checkpointing.load_params(tmp_path / "reference")[0]),
                  jax.tree.leaves(checkpointing.load_params(workdir)[0])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
