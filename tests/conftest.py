import os
import sys
from pathlib import Path

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
