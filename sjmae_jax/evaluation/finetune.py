"""MAE end-to-end fine-tuning (facebookresearch/mae main_finetune.py).

ViTClassifier (global pool + fc_norm by default, or CLS) from the pretrained encoder, head init
trunc-normal 2e-5; AdamW (0.9, 0.999) with weight decay 0.05 on >1-D params except pos_embed /
cls_token, layer-wise lr decay (layer_decay.py), drop path, per-step warmup + cosine to min_lr,
mixup / cutmix with label smoothing (mixup.py) on train views with RandAugment + random erasing
(data recipe 'finetune'), optional EMA of the weights. Evaluates on the eval split every
`eval_every_epochs`; keeps the last train state (WORKDIR/checkpoints, resumable) and the best
params (WORKDIR/best/checkpoints); writes results.json and TensorBoard curves.
"""
import functools
import time

import jax
import jax.numpy as jnp
import optax
from absl import logging
from etils import epath

from sjmae_jax import checkpointing, data, metric_writers, optim, paths, sharding
from sjmae_jax.evaluation import common, layer_decay, mixup
from sjmae_jax.trainer import TimeBudget


def make_optimizer(config, params, depth: int, steps_per_epoch: int):
  total = config.epochs * steps_per_epoch
  schedule = optim.warmup_cosine(optim.base_learning_rate(config),
                                 config.warmup_epochs * steps_per_epoch, total,
                                 config.min_lr)
  opt = config.optim
  parts = []
  if opt.clip_grad_norm:
    parts.append(optax.clip_by_global_norm(opt.clip_grad_norm))
  parts.append(optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                           weight_decay=config.weight_decay,
                           mask=layer_decay.weight_decay_mask))
  # Scaling the whole AdamW update (decay term included) is MAE's per-group lr * lr_scale.
  parts.append(layer_decay.scale_by_layer(params, depth, config.layer_decay))
  return optax.chain(*parts), schedule


def make_train_step(classifier, tx, schedule, config, num_classes: int, finish_batch=None):
  """With `finish_batch` (data.augment_on_device) the step receives pre-batches and computes the
  views (crops, RandAugment, erasing) itself, on the accelerator."""
  mix = config.mixup

  def train_step(state, batch):
    if finish_batch is not None:
      batch = finish_batch(batch)
    rng = jax.random.fold_in(state["rng"], state["step"])
    mix_rng, dropout_rng = jax.random.split(rng)
    images, targets, _ = mixup.mix(
        mix_rng, batch["images"][:, 0], batch["label"], num_classes,
        mixup_alpha=mix.mixup_alpha, cutmix_alpha=mix.cutmix_alpha,
        switch_prob=mix.switch_prob, prob=mix.prob, label_smoothing=config.label_smoothing)

    def loss_fn(params):
      logits = classifier.apply({"params": params}, images, train=True,
                                rngs={"dropout": dropout_rng})
      return optax.softmax_cross_entropy(logits, targets).mean()
    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new_state = dict(state, step=state["step"] + 1, params=params, opt_state=opt_state)
    if "ema_params" in state:
      decay = config.ema_decay
      new_state["ema_params"] = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p,
                                             state["ema_params"], params)
    return new_state, {"loss": loss, "lr": schedule(state["step"]),
                       "grad_norm": optax.tree.norm(grads)}
  return train_step


def _validate(config):
  if config.get("from_scratch") and config.init_from:
    raise ValueError(f"config from_scratch: True, but init_from is also set ({config.init_from}); "
                     "use one of them")
  if config.get("stop_after_minutes", 0.0) < 0:
    raise ValueError(f"config stop_after_minutes: must be >= 0, got {config.stop_after_minutes}")
  if not 0.0 < config.layer_decay <= 1.0:
    raise ValueError(f"config layer_decay: {config.layer_decay} must be in (0, 1]")
  if not 0.0 <= config.ema_decay < 1.0:
    raise ValueError(f"config ema_decay: {config.ema_decay} must be in [0, 1) (0 = off)")
  if not 0.0 <= config.drop_path < 1.0:
    raise ValueError(f"config drop_path: {config.drop_path} must be in [0, 1)")
  common.validate_shared(config, ("epochs", "batch_size", "eval_every_epochs"))


def run(config, workdir: str) -> dict:
  """Fine-tune `config.init_from` as `config` says (or, with `from_scratch`, a randomly
  initialised `config.model`: the supervised baseline); resumes from WORKDIR/checkpoints."""
  _validate(config)
  config = paths.with_absolute_paths(config)
  workdir = epath.Path(paths.absolute(workdir))
  started = time.time()
  mesh = common.make_mesh(config)
  info = data.dataset_info(config.data)
  if config.get("from_scratch"):
    encoder_params, model_config = None, config.model
  else:
    encoder_params, model_config = common.load_encoder(config)
  classifier = common.build_classifier(config, model_config, info.num_classes,
                                       drop_path_rate=config.drop_path,
                                       head_init_std=config.head_init_std)
  depth = classifier.encoder_kwargs["depth"]

  checkpointer = checkpointing.Checkpointer(workdir, max_to_keep=1, save_every_steps=1,
                                            async_save=False)
  best_checkpointer = checkpointing.Checkpointer(workdir / "best", max_to_keep=1,
                                                 save_every_steps=1, async_save=False)
  start_step = checkpointer.latest_step() or 0
  train_data = data.build_train_pipeline(config.data, global_batch_size=config.batch_size,
                                         seed=config.seed, start_step=start_step)
  steps_per_epoch = train_data.steps_per_epoch
  eval_data = data.build_eval_pipeline(config.data, split=config.data.eval_split,
                                       global_batch_size=config.batch_size)

  rng = jax.random.PRNGKey(config.seed)
  init_rng, train_rng = jax.random.split(rng)
  params = common.init_classifier_params(classifier, encoder_params, init_rng)
  tx, schedule = make_optimizer(config, params, depth, steps_per_epoch)

  def init_state(params):
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
             "rng": train_rng, "best_top1": jnp.full((), -1.0), "best_epoch": jnp.zeros((), jnp.int32)}
    if config.ema_decay:
      state["ema_params"] = params
    return state

  abstract_state = jax.eval_shape(init_state, params)
  state_shardings = sharding.tree_shardings(abstract_state, mesh, config.sharding.rules,
                                            config.sharding.min_size)
  if start_step:
    logging.info("Resuming fine-tuning from step %d", start_step)
    abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state,
        state_shardings)
    state = checkpointer.restore(start_step, abstract_state)
  else:
    state = jax.jit(init_state, out_shardings=state_shardings)(params)
  checkpointing.write_config(workdir, config)

  replicated = sharding.replicated(mesh)
  finish_batch = train_data.finish_batch if train_data.augment_on_device else None
  train_step = jax.jit(make_train_step(classifier, tx, schedule, config, info.num_classes,
                                       finish_batch),
                       in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                       out_shardings=(state_shardings, replicated), donate_argnums=(0,))

  def counts(params, batch):
    logits = classifier.apply({"params": params}, batch["images"][:, 0], train=False)
    correct = common.topk_correct(logits, batch["label"], batch["valid"])
    return correct[1], correct[5], jnp.sum(batch["valid"])
  eval_step = jax.jit(counts, out_shardings=replicated)

  is_main = jax.process_index() == 0
  writer = metric_writers.create_default_writer(workdir / "tensorboard", just_logging=not is_main)
  total_steps = config.epochs * steps_per_epoch
  print(f"Fine-tuning for {config.epochs} epochs x {steps_per_epoch} steps from step "
        f"{start_step}, batch {config.batch_size}, lr {optim.base_learning_rate(config):.4g}, "
        f"layer decay {config.layer_decay}; TensorBoard: {workdir / 'tensorboard'}", flush=True)
  batches = iter(train_data)
  best_top1 = float(state["best_top1"])
  metrics, last = {}, {}
  step = start_step
  budget = TimeBudget(config.get("stop_after_minutes", 0.0), steps_per_epoch)
  while step < total_steps:
    state, metrics = train_step(state, sharding.global_batch(next(batches), mesh))
    step += 1
    out_of_time = budget.up(step, metrics)
    if step % steps_per_epoch and not out_of_time:
      continue
    epoch = -(-step // steps_per_epoch)  # the epoch this step belongs to
    scalars = {f"train/{k}": float(v) for k, v in jax.device_get(metrics).items()}
    if epoch % config.eval_every_epochs == 0 or step == total_steps or out_of_time:
      last = common.evaluate(functools.partial(eval_step, state["params"]), eval_data, mesh)
      scalars.update({"eval/top1": last["top1"], "eval/top5": last["top5"]})
      if "ema_params" in state:
        ema = common.evaluate(functools.partial(eval_step, state["ema_params"]), eval_data, mesh)
        last.update(ema_top1=ema["top1"], ema_top5=ema["top5"])
        scalars.update({"eval/ema_top1": ema["top1"], "eval/ema_top5": ema["top5"]})
      if last["top1"] > float(state["best_top1"]):
        best_top1 = last["top1"]  # exact; the state keeps it as float32 for a resume
        state = dict(state, best_top1=jnp.asarray(last["top1"], jnp.float32),
                     best_epoch=jnp.asarray(epoch, jnp.int32))
        best_checkpointer.save(step, {"params": state["params"]}, force=True)
      print(f"epoch {epoch}: top1 {last['top1']:.4f} top5 {last['top5']:.4f} (best "
            f"{float(state['best_top1']):.4f} at epoch {int(state['best_epoch'])})"
            + (f", ema top1 {last['ema_top1']:.4f}" if "ema_top1" in last else ""), flush=True)
    writer.write_scalars(step, scalars)
    checkpointer.save(step, state, force=True)
    if out_of_time:
      print(f"Stopped at step {step} of {total_steps}: stop_after_minutes="
            f"{config.stop_after_minutes} reached", flush=True)
      break
  checkpointer.wait()
  best_checkpointer.wait()
  writer.flush()
  if not last:  # resumed a finished run: evaluate the final state again
    last = common.evaluate(functools.partial(eval_step, state["params"]), eval_data, mesh)
  results = {"top1": last["top1"], "top5": last["top5"], "best_top1": best_top1,
             "best_epoch": int(state["best_epoch"]), "split": config.data.eval_split,
             "num_eval_examples": last["num_examples"], "epochs": config.epochs,
             "init_from": "scratch" if config.get("from_scratch") else str(config.init_from),
             "steps": step, "total_steps": total_steps,
             "wall_seconds": round(time.time() - started, 2)}
  if budget.seconds:
    results["timed_steps"] = step - start_step - 1
    results["timed_seconds"] = round(budget.elapsed, 2)
  if budget.reached:
    results["stopped_after_minutes"] = config.stop_after_minutes
  results.update({k: v for k, v in last.items() if k.startswith("ema_")})
  common.write_results(workdir, results, config)
  checkpointer.close()
  best_checkpointer.close()
  print(f"Done: top1 {results['top1']:.4f} (best {results['best_top1']:.4f} at epoch "
        f"{results['best_epoch']}); results: {workdir / 'results.json'}", flush=True)
  return results
