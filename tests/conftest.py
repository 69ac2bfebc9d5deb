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
