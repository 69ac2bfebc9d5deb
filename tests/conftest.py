import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# torchvision (imported by timm in the interop tests) segfaults when it is imported after
# TensorFlow in the same process on these CPU wheels (torch 2.14.1 / torchvision 0.29.1 / TF 2.21);
# the other order works. The library itself only ever imports plain torch, lazily, which is safe.
try:
  import torchvision  # noqa: F401
except ImportError:
  pass

# The subprocess runs (train.py, the evaluators, launch scripts) compile the same small programs
# over and over: they share one persistent XLA compilation cache per test run, which halves their
# time. In-process JAX is imported first, so it has read its configuration already and does not
# use the cache: tests that read a compiled program's cost analysis always see a fresh compile.
import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402,F401

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID")  # the same in every worker of one run
  if run_id:
    cache_dir = os.path.join(tempfile.gettempdir(), f"sjmae_jax_test_xla_cache_{run_id}")
  else:
    cache_dir = tempfile.mkdtemp(prefix="sjmae_jax_test_xla_cache_")
    atexit.register(shutil.rmtree, cache_dir, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = cache_dir
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"


def pytest_addoption(parser):
  parser.addoption("--run-slow", action="store_true",
                   help="also run the tests marked slow (the GPU scripts' CPU smokes, minutes "
                        "each); CI runs them: pytest -q -n 2 --run-slow -m slow")


def pytest_collection_modifyitems(config, items):
  if config.getoption("--run-slow"):
    return
  slow = [item for item in items if "slow" in item.keywords]
  if slow:  # deselected, not skipped: the README's command says what it ran
    config.hook.pytest_deselected(items=slow)
    items[:] = [item for item in items if "slow" not in item.keywords]


def pytest_configure(config):
  # The subset that the TensorFlow-free virtualenv of .ci/run runs (`pytest -m no_tf`).
  config.addinivalue_line("markers", "no_tf: runs without TensorFlow installed (the CI subset "
                                     "of the virtualenv made from requirements.txt alone)")
  config.addinivalue_line("markers", "slow: minutes each (the GPU scripts run at tiny size on the "
                                     "CPU); only with --run-slow, which CI adds")
  config.addinivalue_line("markers", "tf: the TensorFlow extra's tests (TFRecord datasets): CI "
                                     "runs them in a virtualenv with requirements-tf.txt; "
                                     "without TensorFlow they skip or test the missing extra")


# Runs that several test modules start from, built once per test run (see
# helpers.shared_between_workers); tests read them and copy them before changing anything.

@pytest.fixture(scope="session")
def uninterrupted_run(tmp_path_factory):
  """Workdir of train.py (tests.helpers.run_train, MAE, 1 device) with UNINTERRUPTED_RUN."""
  from tests.helpers import UNINTERRUPTED_RUN, run_train, shared_between_workers

  def build(directory):
    result = run_train(directory / "run", overrides=UNINTERRUPTED_RUN)
    assert result.returncode == 0, result.stderr[-3000:]
  return shared_between_workers(tmp_path_factory, "uninterrupted-run", build) / "run"


@pytest.fixture(scope="session")
def pretrained_mae(tmp_path_factory):
  """(workdir, the summary train_and_evaluate returned, what it printed) of a tiny MAE pretrained
  in process for 3 epochs on digits with the kNN monitor every epoch."""
  import contextlib
  import io
  import json
  from sjmae_jax import trainer
  from tests.helpers import shared_between_workers, tiny_config

  def build(directory):
    config = tiny_config("mae", epochs=3, **{"monitors.knn.every_epochs": 1})
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
      summary = trainer.train_and_evaluate(config, str(directory / "run"))
    (directory / "returned_summary.json").write_text(json.dumps(summary))
    (directory / "printed.txt").write_text(printed.getvalue())
  directory = shared_between_workers(tmp_path_factory, "pretrained-mae", build)
  return (directory / "run", json.loads((directory / "returned_summary.json").read_text()),
          (directory / "printed.txt").read_text())
