"""MaPeT pretraining (Baraldi et al. 2023): permuted prediction with two-stream attention.

  python train.py --config configs/mapet.py --workdir runs/mapet              # digits, CPU
  python train.py --config configs/mapet.py:data=cifar10,model=vit_tiny --workdir runs/mapet_c10
  python train.py --config configs/mapet.py:data=imagenet2012,model=vit_base --workdir gs://...
Token targets (k-means ids of a teacher's patch features; k-CLIP with a CLIP teacher):
  python -m sjmae_jax.tokenizers.fit_kmeans --teacher TEACHER --config configs/mapet.py \
      --out tokenizers/digits.npy
  python train.py --config configs/mapet.py --workdir runs/mapet_tok \
      --config.mapet.target=tokens --config.mapet.tokenizer=tokenizers/digits.npy
Arg keys: model (vit_micro|vit_tiny|vit_small|vit_base|vit_large|vit_huge), data (digits|cifar10|
tfds name|folder:PATH), img (image size; default per dataset), patch.
"""
from sjmae_jax import config_lib


def get_config(arg=None):
  config = config_lib.pretrain_config(arg, method="mapet", views=("mae",))
  on_digits = config.arg.data == "digits"
  config.mapet = dict(
      target="pixels",       # 'pixels' (norm-pix MSE) or 'tokens' (CE over tokenizer ids)
      norm_pix_loss=True,    # for target='pixels'
      num_context=0,         # cls + context patches; 0 = round(50/197 * (1 + num_patches))
      tokenizer="",          # codebook .npy of a fitted tokenizer, for target='tokens'
      codebook_size=512 if on_digits else 8192,  # fit_kmeans' default number of centroids
  )
  config.model.layer_scale_init = 0.1
  config.model.drop_path_rate = 0.1
  config.optim.clip_grad_norm = 3.0
  config.optim.weight_decay = 0.05
  # pos_embed stays the frozen sin-cos table (as every config here); the teacher of token targets
  # is never trained.
  config.optim.lr_mults = ((".*pos_embed", 0.0), ("teacher/.*", 0.0))
  del config.decoder  # no decoder: the query stream predicts
  if not on_digits:  # the paper's ImageNet recipe
    config.batch_size = 2048
    config.blr = 1.5e-3 * 256 / 2048  # lr 1.5e-3 at batch 2048
    config.min_lr = 1e-5
    config.warmup_epochs = 10.0
    config.epochs = 300
    config.optim.b2 = 0.999  # timm's AdamW default betas
  return config.lock()
