"""MAE linear probe (facebookresearch/mae main_linprobe.py), and its fast cached-feature variant.

Protocol ('full'): the pretrained encoder is frozen; its feature (CLS after the final norm, or
with global_pool='avg' the mean patch token through a parameter-free LayerNorm, which is what
MAE's untrained frozen fc_norm is) goes through BatchNorm without affine (eps 1e-6) and a linear
head (trunc-normal std 0.01, bias 0). LARS (momentum 0.9, trust 0.001, wd 0), lr = blr x batch /
256, per-step warmup + cosine, train views RandomResizedCrop + flip (every step runs the
encoder), top-1 / top-5 on the eval split with resize + center crop.

Fast ('fast'): the features of the train split are extracted once without augmentation, and the
same head / optimizer / schedule is trained on them (seconds). It is not the protocol (no
augmentation), so it is reported under its own names (`fast_linprobe/*`, results.json
`fast_top1` / `fast_top5`).
"""
import functools
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from etils import epath

from sjmae_jax import data, metric_writers, optim, paths, sharding
from sjmae_jax.evaluation import common
from sjmae_jax.evaluation.lars import lars
from sjmae_jax.models.heads import BatchNorm
from sjmae_jax.models.vit import timm_trunc_normal

MODES = ("fast", "full", "both")


class ProbeHead(nn.Module):
  """BatchNorm1d(affine=False, eps=1e-6) then Linear (MAE's linear-probe head)."""
  num_classes: int
  init_std: float = 0.01

  @nn.compact
  def __call__(self, features, *, train: bool):
    x = BatchNorm(epsilon=1e-6, use_scale=False, use_bias=False, name="bn")(features, train=train)
    return nn.Dense(self.num_classes, kernel_init=timm_trunc_normal(self.init_std), name="head")(x)


def init_head_state(head, tx, feature_dim: int, rng) -> dict:
  variables = head.init(rng, jnp.zeros((2, feature_dim), jnp.float32), train=False)
  return {"step": jnp.zeros((), jnp.int32), "params": variables["params"],
          "batch_stats": variables["batch_stats"], "opt_state": tx.init(variables["params"])}


def make_head_step(head, tx, schedule):
  """(state, features, labels) -> (state, metrics): one LARS step of the head."""
  def step(state, features, labels):
    def loss_fn(params):
      logits, updated = head.apply({"params": params, "batch_stats": state["batch_stats"]},
                                   features, train=True, mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return loss, (updated["batch_stats"], jnp.mean(jnp.argmax(logits, -1) == labels))
    (loss, (batch_stats, accuracy)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    new_state = dict(state, step=state["step"] + 1, params=optax.apply_updates(state["params"], updates),
                     batch_stats=batch_stats, opt_state=opt_state)
    return new_state, {"loss": loss, "train_top1": accuracy, "lr": schedule(state["step"])}
  return step


def make_optimizer(config, steps_per_epoch: int):
  total = config.epochs * steps_per_epoch
  schedule = optim.warmup_cosine(optim.base_learning_rate(config),
                                 config.warmup_epochs * steps_per_epoch, total,
                                 config.min_lr)
  tx = lars(schedule, momentum=config.lars.momentum,
            trust_coefficient=config.lars.trust_coefficient, weight_decay=config.weight_decay)
  return tx, schedule


def _validate(config):
  if config.mode not in MODES:
    raise ValueError(f"config mode: {config.mode!r} is not one of {MODES}")
  common.validate_shared(config)


def run(config, workdir: str) -> dict:
  """Linear-probe `config.init_from` as `config` says; writes results.json in `workdir`."""
  _validate(config)
  config = paths.with_absolute_paths(config)
  workdir = epath.Path(paths.absolute(workdir))
  started = time.time()
  mesh = common.make_mesh(config)
  info = data.dataset_info(config.data)
  encoder_params, model_config = common.load_encoder(config)
  classifier = common.build_classifier(config, model_config, info.num_classes)
  rng = jax.random.PRNGKey(config.seed)
  init_rng, head_rng = jax.random.split(rng)
  params = common.init_classifier_params(classifier, encoder_params, init_rng)
  frozen = {k: v for k, v in params.items() if k != "head"}  # encoder (+ untrained fc_norm)
  frozen = jax.device_put(frozen, sharding.tree_shardings(frozen, mesh, config.sharding.rules,
                                                          config.sharding.min_size))
  replicated = sharding.replicated(mesh)

  def features_fn(frozen_params, images):
    features = classifier.apply({"params": frozen_params}, images, method="features")
    return jax.lax.stop_gradient(features.astype(jnp.float32))

  head = ProbeHead(info.num_classes, config.head_init_std)
  feature_dim = classifier.encoder_kwargs["embed_dim"]
  writer = metric_writers.create_default_writer(workdir / "tensorboard",
                                                just_logging=jax.process_index() != 0)
  eval_data = data.build_eval_pipeline(config.data, split=config.data.eval_split,
                                       global_batch_size=config.batch_size)
  results = {"split": config.data.eval_split, "init_from": str(config.init_from),
             "wall_seconds": {}}

  def head_logits_counts(state, features, batch):
    logits = head.apply({"params": state["params"], "batch_stats": state["batch_stats"]},
                        features, train=False)
    counts = common.topk_correct(logits, batch["label"], batch["valid"])
    return counts[1], counts[5], jnp.sum(batch["valid"])

  if config.mode in ("fast", "both"):
    mode_started = time.time()
    extract = jax.jit(lambda p, batch: (features_fn(p, batch["images"][:, 0]), batch["label"],
                                        batch["valid"]), out_shardings=replicated)

    def extract_split(split):
      pipeline = data.build_eval_pipeline(config.data, split=split,
                                          global_batch_size=config.batch_size)
      features, labels = [], []
      for local_batch in pipeline:
        f, y, valid = jax.device_get(extract(frozen, sharding.global_batch(local_batch, mesh)))
        features.append(f[valid])
        labels.append(y[valid])
      return np.concatenate(features), np.concatenate(labels)

    train_features, train_labels = extract_split(config.data.train_split)
    eval_features, eval_labels = extract_split(config.data.eval_split)
    extracted = time.time() - mode_started
    state = train_head_on_features(config, head, head_rng, train_features, train_labels, mesh,
                                   writer, prefix="fast_linprobe")
    metrics = evaluate_head_on_features(head, state, eval_features, eval_labels)
    results.update(fast_top1=metrics["top1"], fast_top5=metrics["top5"])
    results["wall_seconds"]["fast"] = round(time.time() - mode_started, 2)
    results["wall_seconds"]["fast_feature_extraction"] = round(extracted, 2)
    writer.write_scalars(int(state["step"]), {"fast_linprobe/top1": metrics["top1"],
                                              "fast_linprobe/top5": metrics["top5"]})
    print(f"fast linear probe (cached features, no augmentation): top1 {metrics['top1']:.4f} "
          f"top5 {metrics['top5']:.4f} on {len(eval_labels)} {config.data.eval_split} examples "
          f"({results['wall_seconds']['fast']:.1f} s)", flush=True)

  if config.mode in ("full", "both"):
    mode_started = time.time()
    train_data = data.build_train_pipeline(config.data, global_batch_size=config.batch_size,
                                           seed=config.seed)
    steps_per_epoch = train_data.steps_per_epoch
    tx, schedule = make_optimizer(config, steps_per_epoch)
    state = jax.device_put(init_head_state(head, tx, feature_dim, head_rng), replicated)
    head_step = make_head_step(head, tx, schedule)

    finish_batch = train_data.finish_batch if train_data.augment_on_device else None

    def train_step(state, frozen_params, batch):
      if finish_batch is not None:  # data.augment_on_device: views computed here
        batch = finish_batch(batch)
      return head_step(state, features_fn(frozen_params, batch["images"][:, 0]), batch["label"])
    train_step = jax.jit(train_step, donate_argnums=(0,), out_shardings=replicated)
    eval_step = jax.jit(lambda state, frozen_params, batch: head_logits_counts(
        state, features_fn(frozen_params, batch["images"][:, 0]), batch),
        out_shardings=replicated)
    batches = iter(train_data)
    total_steps = config.epochs * steps_per_epoch
    print(f"Linear probe: {config.epochs} epochs x {steps_per_epoch} steps, batch "
          f"{config.batch_size}, lr {optim.base_learning_rate(config):.4g}", flush=True)
    for epoch in range(config.epochs):
      for _ in range(steps_per_epoch):
        state, metrics = train_step(state, frozen, sharding.global_batch(next(batches), mesh))
      step = epoch * steps_per_epoch + steps_per_epoch
      writer.write_scalars(step, {f"linprobe/train_{k}" if k != "lr" else "linprobe/lr": float(v)
                                  for k, v in jax.device_get(metrics).items()})
      if (epoch + 1) % config.eval_every_epochs == 0 or step == total_steps:
        evaluation = common.evaluate(functools.partial(eval_step, state, frozen), eval_data, mesh)
        writer.write_scalars(step, {"linprobe/top1": evaluation["top1"],
                                    "linprobe/top5": evaluation["top5"]})
        print(f"epoch {epoch + 1}: linprobe top1 {evaluation['top1']:.4f} top5 "
              f"{evaluation['top5']:.4f}", flush=True)
    results.update(top1=evaluation["top1"], top5=evaluation["top5"])
    results["wall_seconds"]["full"] = round(time.time() - mode_started, 2)

  results["epochs"] = config.epochs
  results["wall_seconds"]["total"] = round(time.time() - started, 2)
  writer.flush()
  common.write_results(workdir, results, config)
  logging.info("results: %s", results)
  print(f"results: {workdir / 'results.json'}", flush=True)
  return results


def train_head_on_features(config, head, rng, features, labels, mesh, writer, prefix):
  """Train the probe head on cached features: same optimizer, schedule and epochs as the
  protocol, examples reshuffled every epoch (permutation from the seed), remainder dropped."""
  batch_size = config.batch_size
  steps_per_epoch = common.num_steps(len(labels), batch_size, f"{config.data.train_split!r}")
  tx, schedule = make_optimizer(config, steps_per_epoch)
  replicated = sharding.replicated(mesh)
  state = jax.device_put(init_head_state(head, tx, features.shape[1], rng), replicated)
  step_fn = jax.jit(make_head_step(head, tx, schedule), donate_argnums=(0,),
                    out_shardings=replicated)
  process, count = jax.process_index(), jax.process_count()
  local = batch_size // count
  order_rng = np.random.default_rng(config.seed)
  for epoch in range(config.epochs):
    order = order_rng.permutation(len(labels))[:steps_per_epoch * batch_size]
    for indices in order.reshape(steps_per_epoch, batch_size):
      mine = indices[process * local:(process + 1) * local]
      batch = sharding.global_batch({"features": features[mine], "label": labels[mine]}, mesh)
      state, metrics = step_fn(state, batch["features"], batch["label"])
    writer.write_scalars((epoch + 1) * steps_per_epoch,
                         {f"{prefix}/train_{k}" if k != "lr" else f"{prefix}/lr": float(v)
                          for k, v in jax.device_get(metrics).items()})
  return state


def evaluate_head_on_features(head, state, features, labels) -> dict:
  logits = jax.jit(lambda s, f: head.apply({"params": s["params"], "batch_stats": s["batch_stats"]},
                                           f, train=False))(state, jnp.asarray(features))
  labels = jnp.asarray(labels)
  counts = common.topk_correct(logits, labels, jnp.ones_like(labels, bool))
  return {"top1": float(counts[1]) / len(labels), "top5": float(counts[5]) / len(labels)}
