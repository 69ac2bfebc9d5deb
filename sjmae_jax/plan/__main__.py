"""`python -m sjmae_jax.plan`: the memory plan's command line (sjmae_jax.cli.plan_main)."""
from sjmae_jax import cli

if __name__ == "__main__":
  cli.plan_main()
