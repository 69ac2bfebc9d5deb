"""MAE fine-tuning of a pretrained encoder (eval_finetune.py).

  python eval_finetune.py --config configs/finetune.py --workdir runs/ft --config.init_from=runs/mae
  python eval_finetune.py --config configs/finetune.py:data=cifar10 --workdir runs/ft_c10 \
      --config.init_from=runs/mae_c10
  python eval_finetune.py --config configs/finetune.py:data=imagenet2012,model=vit_base \
      --workdir runs/ft_b --config.init_from=mae_pretrain_vit_base.pth --config.blr=5e-4 \
      --config.optim.layer_decay=0.65 --config.epochs=100
Arg keys: data, img, patch, model (only for a weights file; a pretraining workdir's config.json
gives the architecture). Defaults are main_finetune.py's (blr 1e-3, layer decay 0.75, 50 epochs);
the MAE README's ViT-B recipe is in the last example.
"""
import ml_collections

from sjmae_jax import config_lib


def get_config(arg=None):
  config = config_lib.evaluation_config(arg, views=("finetune",), global_pool="avg")  # MAE's
  on_digits = config.arg.data == "digits"
  # True: train config.model from a random init instead (the supervised-from-scratch baseline;
  # init_from stays empty). Layer-wise lr decay is then usually switched off (optim.layer_decay=1).
  config.from_scratch = False
  config.model.drop_path_rate = 0.1  # also on a pretraining workdir's architecture
  # Train views: RRC(0.08-1, bicubic) + flip + RandAugment rand-m9-mstd0.5-inc1 + random erasing
  # 0.25 ('pixel'); change them with --config.data.recipes.finetune.randaugment / ...erase_prob.

  config.batch_size = 128 if on_digits else 1024
  config.epochs = 30 if on_digits else 50
  config.warmup_epochs = 5.0
  config.blr = 1e-3
  config.lr = 0.0  # absolute peak lr; 0 = blr * batch_size / 256
  config.min_lr = 1e-6
  # AdamW (0.9, 0.999), weight decay 0.05 except 1-D params and pos_embed / cls_token (MAE's
  # no_weight_decay list), layer-wise lr decay 0.75; pos_embed is trained here.
  config.optim = config_lib.optim_config(
      b2=0.999, layer_decay=0.75, lr_mults=(),
      wd_mults=((r"(.*/)?(pos_embed|cls_token|dist_token)", 0.0),))
  config.label_smoothing = 0.1
  # off_fraction: the last fraction of the schedule's steps without mixup / cutmix (0 = never off).
  config.mixup = ml_collections.ConfigDict(dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0,
                                                switch_prob=0.5, off_fraction=0.0))
  config.ema_decay = 0.0  # e.g. 0.9999: also evaluate an EMA of the weights (monitor eval_ema)
  config.head_init_std = 2e-5
  config_lib.add_run_keys(config, checkpoint_every=dict(every_epochs=1),
                          log_every_steps=10 if on_digits else 100)
  config.checkpoint.keep = 1
  # Top-1 / top-5 on data.eval_split every epoch and at the end; the best params by eval/top1 are
  # kept in WORKDIR/best. eval_ema scores the EMA weights (when ema_decay > 0).
  config.monitors = ml_collections.ConfigDict(dict(
      eval=dict(type="classification", every_epochs=1),
      eval_ema=dict(type="classification", every_epochs=1, params="ema_params",
                    prefix="eval/ema_")))
  if config.arg.data == "cifar10":
    # Short CIFAR schedules (minutes, ~25-100 epochs) with lighter regularization than MAE's
    # 100-epoch ImageNet recipe. Views: data.recipes.finetune (pad-4 crop + flip + RandAugment, no
    # erasing; config_lib.cifar10_recipes). Mixup / cutmix on half of the batches and off for the
    # last 20 % of the steps: the schedule ends on clean images (DeiT III and the CCT / SPT CIFAR
    # recipes keep them on for 300 epochs; a few minutes cannot afford that). Label smoothing
    # 0.1 and drop path 0.1 as ViT-CIFAR / MAE; layer decay 0.85: ViT-T has 12 blocks but
    # ImageNet's 0.75 (0.65 for ViT-B) assumes a long schedule (MAE: smaller models, larger decay).
    config.mixup.update(prob=0.5, off_fraction=0.2)
    config.optim.layer_decay = 0.85
  if on_digits:
    # The demo data are 8x8 digits: flips, RandAugment, erasing and mixup change or erase the
    # class (6/9, 2/5), and the 4-block encoder tolerates less decay. Measured on the README's SJ-MAE
    # run (fast probe 91.9): the recipe above gives 51.3 top-1; this one 93.3.
    config.data.recipes.finetune.update(randaugment="", random_erase_prob=0.0, flip_prob=0.0,
                                        rrc_scale=(0.35, 1.0))
    config.mixup.prob = 0.0
    config.optim.layer_decay, config.blr = 0.9, 2e-3
  return config.lock()
