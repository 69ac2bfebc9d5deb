"""Visual tokenizers for token-target pretraining (MaPeT's k-means / k-CLIP targets).

  kmeans.py      nearest_centroid (chunked), kmeans (jitted Lloyd, random or k-means++ init)
  tokenizer.py   teacher loading (workdir or weights file), teacher_features, the tokenizer files
  fit_kmeans.py  the CLI: python -m sjmae_jax.tokenizers.fit_kmeans --teacher ... --out X.npy
"""
