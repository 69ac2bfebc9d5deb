"""Linear-probe a pretrained encoder (see `python eval_linprobe.py --help`).

  python eval_linprobe.py --config configs/linprobe.py[:arg] --workdir DIR --config.init_from=PATH
"""
from sjmae_jax import cli

if __name__ == "__main__":
  cli.linprobe_main()
