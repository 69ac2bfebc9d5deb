"""sjmae_jax without TensorFlow: no module imports it when loaded, and a CIFAR-10-style ImageFolder
pretraining (with the kNN monitor) and the input benchmark run without it.

.ci/run runs every `no_tf` test (these, the README command, evaluators and export of
test_first_run.py, the data tests, the train-step benchmark smoke) in a virtualenv made from
requirements.txt alone, where `import tensorflow` fails. In the main virtualenv the import check
runs with TensorFlow made unimportable.
"""
import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from tests.helpers import REPO, tiny_config

pytestmark = pytest.mark.no_tf

# Run first in a subprocess: any `import tensorflow` (also from a library) fails, as it would on a
# host without TensorFlow.
BLOCK_TENSORFLOW = textwrap.dedent("""
    import importlib.abc, sys
    class NoTensorFlow(importlib.abc.MetaPathFinder):
      def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] == 'tensorflow':
          raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    sys.meta_path.insert(0, NoTensorFlow())
""")


def run_python(script, timeout=900):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  return subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=timeout)


@pytest.mark.tf  # also where TensorFlow is installed, made unimportable (.ci/run's TF virtualenv)
def test_every_module_loads_without_tensorflow_or_tfds():
  result = run_python(BLOCK_TENSORFLOW + textwrap.dedent("""
      import importlib, pkgutil, sys
      import sjmae_jax
      names = [m.name for m in pkgutil.walk_packages(sjmae_jax.__path__, 'sjmae_jax.')]
      names += ['benchmarks.train_step', 'benchmarks.input_pipeline', 'benchmarks.flops']
      for name in names:
        importlib.import_module(name)
      loaded = sorted({m.split('.')[0] for m in sys.modules})
      print(len(names), [m for m in loaded if m in ('tensorflow', 'tensorflow_datasets', 'clu',
                                                     'grain', 'tensorboardX')])
  """))
  assert result.returncode == 0, result.stderr[-3000:]
  count, loaded = result.stdout.strip().splitlines()[-1].split(" ", 1)
  assert int(count) > 40  # every module of the package was imported
  # TFDS is imported only for tfds: sources; TensorBoard's writer only when a run writes.
  assert loaded == "['clu', 'grain']"


def write_cifar_shaped_folder(root, per_class_train=10, per_class_test=3):
  """ROOT/{train,test}/<class>/*.jpg: 32 px JPEGs, 4 classes, each class its own tint plus noise
  (so that features can tell the classes apart)."""
  rng = np.random.default_rng(0)
  tints = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40)]
  for split, count in (("train", per_class_train), ("test", per_class_test)):
    for label, tint in enumerate(tints):
      class_dir = root / split / f"class_{label}"
      class_dir.mkdir(parents=True)
      for index in range(count):
        pixels = np.clip(np.asarray(tint) + rng.normal(0, 30, (32, 32, 3)), 0, 255)
        Image.fromarray(pixels.astype(np.uint8)).save(class_dir / f"{index:04d}.jpg", quality=90)


@pytest.mark.slow
def test_cifar10_shaped_folder_pretraining_with_knn_and_tensorboard(tmp_path):
  """SJ-MAE (two simclr views) on an ImageFolder of JPEGs, as on CIFAR-10: the folder cache is
  prepared, training runs, the kNN monitor reports, TensorBoard gets its event file."""
  from sjmae_jax import trainer  # pylint: disable=import-outside-toplevel
  root = tmp_path / "cifar"
  write_cifar_shaped_folder(root)
  config = tiny_config("sjmae", epochs=3, batch_size=8, warmup_epochs=1, log_every_steps=5,
                       **{"monitors.knn.every_epochs": 1, "monitors.knn.k": 5})
  config.data.source = f"folder:{root}"
  config.data.data_dir = str(tmp_path / "prepared")
  config.data.img_size = config.model.img_size = 32
  with contextlib.redirect_stdout(io.StringIO()):
    summary = trainer.train_and_evaluate(config, str(tmp_path / "run"))
  assert summary["step"] == summary["total_steps"] == 3 * (40 // 8)
  assert np.isfinite(summary["loss"]) and 0.0 <= summary["knn/top1"] <= 1.0
  assert json.loads((tmp_path / "run" / "summary.json").read_text())["step"] == 15
  assert list((tmp_path / "prepared" / "sjmae_folder_cache").iterdir())  # the uint8 cache
  assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


def test_input_benchmark_smoke():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "input_pipeline.py"),
                           "--smoke"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  rates = [float(line.split("images/s")[0].split()[-1]) for line in result.stdout.splitlines()
           if line.startswith("(")]
  # 2 + 2 + 2 rows (photos224), + the OpenCV-resize row with 2 workers where OpenCV is installed
  with_opencv = importlib.util.find_spec("cv2") is not None
  assert len(rates) == 6 + with_opencv and all(rate > 0 for rate in rates), result.stdout
  assert ("opencv resize" in result.stdout) == with_opencv
  assert "TensorFlow loaded" not in result.stdout
