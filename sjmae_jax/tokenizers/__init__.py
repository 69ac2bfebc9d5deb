"""Visual tokenizers for token-target pretraining (MaPeT's k-means / k-CLIP targets).

  kmeans.py      nearest_centroid (chunked), kmeans (jitted Lloyd, random or k-means++ init)
  tokenizer.py   teachers (workdir, ViT weights file, CLIP tower: all models.vit ViTs),
                 teacher_features, the files
  fit_kmeans.py  the CLI: python -m sjmae_jax.tokenizers.fit_kmeans --teacher ... --out X.npy
"""
