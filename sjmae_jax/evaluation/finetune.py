"""MAE end-to-end fine-tuning (facebookresearch/mae main_finetune.py), on the engine's loop.

ViTClassifier (global pool + fc_norm by default, or CLS) from the pretrained encoder (or, with
`from_scratch`, a random init of `config.model`: the supervised baseline), head init trunc-normal
2e-5; the optimizer policy of config.optim (AdamW (0.9, 0.999), weight decay 0.05 on >1-D params
except pos_embed / cls_token, layer-wise lr decay), drop path (model.drop_path_rate), per-step
warmup + cosine to min_lr, mixup / cutmix with label smoothing (mixup.py) on train views with
RandAugment + random erasing (data recipe 'finetune'), optional EMA of the weights. The monitors
of config.monitors evaluate on the eval split (every epoch by default); the engine keeps the last
train state (WORKDIR/checkpoints, resumable), the best params (WORKDIR/best) and writes
results.json.
"""
import jax
import jax.numpy as jnp

from sjmae_jax import data, engine, evaluation, optim, paths
from sjmae_jax.evaluation import common, mixup
from sjmae_jax.objectives.losses import softmax_cross_entropy


def mixup_off_step(config, total_steps: int) -> int:
  """The first step (0-based) without mixup / cutmix: the last `mixup.off_fraction` of the
  schedule trains on clean images; total_steps when off_fraction is 0."""
  fraction = config.mixup.get("off_fraction", 0.0)
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f"config mixup.off_fraction: {fraction} must be in [0, 1]")
  return int(round(total_steps * (1.0 - fraction)))


def make_loss_fn(classifier, config, num_classes: int, total_steps: int = 0):
  """(params, batch_stats, batch, rng, step) -> (loss, (metrics, batch_stats)): mixup / cutmix
  with label smoothing (off from `mixup_off_step`), then the soft-target cross-entropy of the
  classifier (drop path on)."""
  mix = config.mixup
  off_step = None
  if mix.get("off_fraction", 0.0):
    if total_steps <= 0:
      raise ValueError("make_loss_fn: config mixup.off_fraction needs the schedule's total_steps")
    off_step = mixup_off_step(config, total_steps)

  def loss_fn(params, batch_stats, batch, rng, step=None):
    mix_rng, dropout_rng = jax.random.split(rng)
    prob = mix.prob
    if off_step is not None:
      prob = jnp.where(step < off_step, prob, 0.0)
    images, targets, _ = mixup.mix(
        mix_rng, batch["images"][:, 0], batch["label"], num_classes,
        mixup_alpha=mix.mixup_alpha, cutmix_alpha=mix.cutmix_alpha,
        switch_prob=mix.switch_prob, prob=prob, label_smoothing=config.label_smoothing)
    logits = classifier.apply({"params": params}, images, train=True, rngs={"dropout": dropout_rng})
    loss, _ = softmax_cross_entropy(logits, targets)  # the accuracy of mixed targets means little
    return loss, ({}, batch_stats)
  return loss_fn


def ema_update(decay: float):
  def update(state):
    return dict(state, ema_params=jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p,
                                               state["ema_params"], state["params"]))
  return update


def program(config) -> engine.Program:
  config = common.checked(config)
  if config.from_scratch and config.init_from:
    raise ValueError(f"config from_scratch: True, but init_from is also set ({config.init_from}); "
                     "use one of them")
  if not 0.0 <= config.ema_decay < 1.0:
    raise ValueError(f"config ema_decay: {config.ema_decay} must be in [0, 1) (0 = off)")
  info = data.dataset_info(config.data)
  if config.from_scratch:
    model_config, load_encoder = config.model, None
  else:
    model_config, load_encoder = common.encoder_source(config)
  classifier = common.build_classifier(config, model_config, info.num_classes,
                                       head_init_std=config.head_init_std)

  def init_state(rng):
    init_rng, train_rng = jax.random.split(rng)
    params = classifier.init(init_rng, common.sample_images(classifier))["params"]
    state = {"params": params, "batch_stats": {}, "rng": train_rng}
    if config.ema_decay:
      state["ema_params"] = params
    return state

  def build(start_step):
    train_data, tx, schedule, mesh = common.training(config, start_step)
    steps_per_epoch = train_data.steps_per_epoch
    monitors = evaluation.build_monitors(
        without_ema_monitors(config), mesh, steps_per_epoch=steps_per_epoch,
        features_fn=lambda state, images: classifier.apply(
            {"params": state["params"]}, images, method="features"),
        logits_fn=lambda state, images: classifier.apply({"params": state["params"]}, images))
    ema_keys = ("params", "ema_params") if config.ema_decay else ("params",)
    after_init = None
    if load_encoder is not None:
      encoder_params = load_encoder()
      after_init = lambda state, shardings: common.put_encoder(
          state, shardings, encoder_params, config.global_pool, ema_keys)
    source = "scratch" if config.from_scratch else paths.shown(config.init_from)

    def describe(num_params, start):
      return (f"fine-tuning {source}: {num_params / 1e6:.2f} M params, {config.global_pool} pool, "
              f"{info.num_classes} classes; data {config.data.source} "
              f"({train_data.num_examples:,} train images)\n"
              f"global batch {config.batch_size}, lr {optim.base_learning_rate(config):.4g}, "
              f"layer decay {config.optim.layer_decay}, {config.epochs * steps_per_epoch} steps "
              f"({config.epochs} epochs x {steps_per_epoch}), from step {start}")

    def finalize(summary):
      results = {"top1": summary.get("eval/top1"), "top5": summary.get("eval/top5"),
                 "best_top1": summary.get("best/eval/top1"),
                 "best_epoch": (summary["best/step"] // steps_per_epoch
                                if summary.get("best/step") else None),
                 "split": config.data.eval_split, "epochs": config.epochs,
                 "num_eval_examples": summary.get("eval/num_examples"),
                 "init_from": "scratch" if config.from_scratch else str(config.init_from)}
      if config.ema_decay:
        results.update(ema_top1=summary.get("eval/ema_top1"), ema_top5=summary.get("eval/ema_top5"))
      return common.with_config(dict(summary, **results), config)

    return engine.Task(
        config=config, train_data=train_data, total_steps=config.epochs * steps_per_epoch,
        init_state=init_state,
        loss_fn=make_loss_fn(classifier, config, info.num_classes,
                             config.epochs * steps_per_epoch),
        loss_takes_step=bool(config.mixup.get("off_fraction", 0.0)),
        tx=tx, schedule=schedule, describe=describe, monitors=monitors,
        after_update=ema_update(config.ema_decay) if config.ema_decay else None,
        after_init=after_init, summary_file="results.json", keep_best="eval/top1",
        finalize=finalize)

  return engine.Program(config, abstract_state=lambda: common.state_shapes(config, init_state),
                        build=build)


def without_ema_monitors(config):
  """config with the monitors of the EMA weights left out when there is no EMA (ema_decay 0)."""
  if config.ema_decay:
    return config
  config = config.copy_and_resolve_references()
  with config.unlocked():
    for name in [n for n, spec in config.monitors.items() if spec.get("params") == "ema_params"]:
      del config.monitors[name]
  return config


def run(config, workdir: str) -> dict:
  """Fine-tune as `config` says in `workdir` (resuming from its latest checkpoint); returns what
  results.json holds."""
  return engine.run(program(config), workdir)
