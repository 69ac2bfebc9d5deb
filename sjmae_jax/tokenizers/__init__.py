"""Visual tokenizers for token-target pretraining (MaPeT's k-means / k-CLIP targets).

  kmeans.py      nearest_centroid (chunked), kmeans (jitted Lloyd, random or k-means++ init)
  tokenizer.py   teachers (workdir, ViT weights file, CLIP tower), teacher_features, the files
  clip.py        timm CLIP image towers (pre-norm, QuickGELU) as teachers
  fit_kmeans.py  the CLI: python -m sjmae_jax.tokenizers.fit_kmeans --teacher ... --out X.npy
"""
