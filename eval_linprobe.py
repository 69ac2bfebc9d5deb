"""Linear-probe a pretrained encoder with the MAE protocol (+ a fast cached-feature probe).

  python eval_linprobe.py --config configs/linprobe.py[:arg] --workdir DIR --config.init_from=PATH
PATH: a pretraining workdir (its latest checkpoint) or a weights file (timm / MAE). Writes
DIR/results.json and TensorBoard logs in DIR/tensorboard.
"""
from sjmae_jax import cli

_CONFIG, _WORKDIR = cli.define_flags("Directory for results.json and TensorBoard logs.")


def main(argv):
  del argv
  config = cli.loaded_config(_CONFIG)
  from sjmae_jax.evaluation import linear_probe
  try:
    linear_probe.run(config, _WORKDIR.value)
  except (ValueError, FileNotFoundError, OSError) as e:
    cli.fail(str(e))


if __name__ == "__main__":
  cli.run(main)
