"""Linear-probe a pretrained encoder with the MAE protocol (+ a fast cached-feature probe).

  python eval_linprobe.py --config configs/linprobe.py[:arg] --workdir DIR --config.init_from=PATH
PATH: a pretraining workdir (its latest checkpoint) or a weights file (timm / MAE). Writes
DIR/results.json and TensorBoard logs in DIR/tensorboard.
"""
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path[:arg]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for results.json and TensorBoard logs.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  from sjmae_jax.evaluation import linear_probe
  try:
    linear_probe.run(_CONFIG.value, _WORKDIR.value)
  except (ValueError, FileNotFoundError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  app.run(main)
