"""Fine-tune a pretrained encoder with the MAE protocol.

  python eval_finetune.py --config configs/finetune.py[:arg] --workdir DIR --config.init_from=PATH
PATH: a pretraining workdir (its latest checkpoint) or a weights file (timm / MAE). Writes
DIR/results.json, TensorBoard logs in DIR/tensorboard,
the last state in DIR/checkpoints (rerunning resumes) and the best params in DIR/best.
"""
from sjmae_jax import cli

_CONFIG, _WORKDIR = cli.define_flags("Directory for results.json, checkpoints and TensorBoard logs.")


def main(argv):
  del argv
  config = cli.loaded_config(_CONFIG)
  from sjmae_jax.evaluation import finetune
  try:
    finetune.run(config, _WORKDIR.value)
  except (ValueError, FileNotFoundError, OSError) as e:
    cli.fail(str(e))


if __name__ == "__main__":
  cli.run(main)
