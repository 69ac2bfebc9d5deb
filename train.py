"""Pretrain a ViT with any sjmae_jax objective.

  python train.py --config configs/mae.py[:arg] --workdir DIR [--config.key=value ...]
Restarting the same command resumes from the workdir's latest checkpoint.

Exit status: 0 done, or stopped by SIGTERM with a checkpoint (rerun to resume); 2 a bad config,
workdir or data (one `error:` line on stderr, nothing written); 3 stopped at a non-finite loss
(config nonfinite='stop'); 1 anything unexpected (with its traceback).
"""
from sjmae_jax import cli

_CONFIG, _WORKDIR = cli.define_flags("Directory for checkpoints, logs and summary.json.")
NONFINITE_ERROR = 3


def main(argv):
  del argv
  config = cli.loaded_config(_CONFIG)
  from sjmae_jax import checkpointing, trainer
  trainer.initialize_distributed(config.distributed)
  try:
    trainer.train_and_evaluate(config, _WORKDIR.value)
  except (ValueError, FileNotFoundError, checkpointing.WorkdirError) as e:  # DataError is a ValueError
    cli.fail(str(e))
  except trainer.NonFiniteLossError as e:
    cli.fail(str(e), NONFINITE_ERROR)


if __name__ == "__main__":
  cli.run(main)
