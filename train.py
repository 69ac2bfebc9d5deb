"""Pretrain a ViT with any sjmae_jax objective (see `python train.py --help`).

  python train.py --config configs/sjmae.py[:arg] --workdir DIR [--config.key=value ...]
"""
from sjmae_jax import cli

if __name__ == "__main__":
  cli.train_main()
