"""Pretrain a ViT with any sjmae_jax objective.

  python train.py --config configs/mae.py[:arg] --workdir DIR [--config.key=value ...]
Restarting the same command resumes from the workdir's latest checkpoint.
"""
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path[:arg]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and summary.json.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  config = _CONFIG.value
  from sjmae_jax import trainer
  trainer.initialize_distributed(config.distributed)
  try:
    trainer.train_and_evaluate(config, _WORKDIR.value)
  except (ValueError, FileNotFoundError) as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  app.run(main)
