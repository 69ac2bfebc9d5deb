"""Fine-tune a pretrained encoder (see `python eval_finetune.py --help`).

  python eval_finetune.py --config configs/finetune.py[:arg] --workdir DIR --config.init_from=PATH
"""
from sjmae_jax import cli

if __name__ == "__main__":
  cli.finetune_main()
