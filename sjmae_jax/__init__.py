"""sjmae_jax: multi-task self-supervised ViT pretraining (SJ-MAE, MAE and relatives) in JAX/Flax."""
