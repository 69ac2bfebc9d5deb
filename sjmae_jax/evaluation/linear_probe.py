"""MAE linear probe (facebookresearch/mae main_linprobe.py) on the engine's loop, and its fast
cached-feature variant (also a monitor).

Protocol ('full'): the pretrained encoder is frozen (config.optim.lr_mults gives it multiplier
0: no update, no optimizer state); its feature (CLS after the final norm, or with
global_pool='avg' the mean patch token through a parameter-free LayerNorm, which is what MAE's
untrained frozen fc_norm is) goes through BatchNorm without affine (eps 1e-6) and a linear head
(trunc-normal std 0.01, bias 0). LARS (momentum 0.9, trust 0.001, wd 0), lr = blr x batch / 256,
per-step warmup + cosine, train views RandomResizedCrop + flip (every step runs the encoder),
top-1 / top-5 on the eval split with resize + center crop (the `eval` monitor).

Fast ('fast'): the features of the train split are extracted once without augmentation, and the
same head / optimizer / schedule is trained on them (seconds). It is not the protocol (no
augmentation), so it is reported under its own names (results.json `fast_top1` / `fast_top5`;
as a monitor during pretraining, `fast_probe/top1`).
"""
import json
import time

import jax
import jax.numpy as jnp
from etils import epath

from sjmae_jax import checkpointing, data, engine, evaluation, optim, paths, sharding
from sjmae_jax.evaluation import common, knn
from sjmae_jax.evaluation.fast_probe import (ProbeHead, evaluate_head_on_features, head_loss,
                                             head_settings, train_head_on_features)

MODES = ("fast", "full", "both")
HEAD = "probe_head"  # the head's params in the probe's state, beside the classifier's encoder


# ---------------------------------------------------------------------------------------------
# The program.


def parts(config):
  """(checked config, dataset info, classifier, loader of the pretrained encoder)."""
  config = common.checked(config)
  if config.mode not in MODES:
    raise ValueError(f"config mode: {config.mode!r} is not one of {MODES}")
  info = data.dataset_info(config.data)
  model_config, load_encoder = common.encoder_source(config)
  return config, info, common.build_classifier(config, model_config, info.num_classes), load_encoder


def program(config) -> engine.Program:
  """The linear probe of `config.init_from` (mode 'full' / 'both': the protocol, on the engine)."""
  config, info, classifier, load_encoder = parts(config)
  head = ProbeHead(info.num_classes, config.head_init_std)
  feature_dim = classifier.encoder_kwargs["embed_dim"]

  def init_state(rng):
    init_rng, head_rng = jax.random.split(rng)
    params = dict(classifier.init(init_rng, common.sample_images(classifier))["params"])
    del params["head"]  # the classifier's own head: the probe has its own
    head_variables = head.init(head_rng, jnp.zeros((2, feature_dim), jnp.float32), train=False)
    return {"params": dict(params, **{HEAD: head_variables["params"]}),
            "batch_stats": head_variables["batch_stats"], "rng": head_rng}

  def features(params, images):  # of the frozen encoder: no gradient flows back into it
    encoder = {k: v for k, v in params.items() if k != HEAD}
    out = classifier.apply({"params": encoder}, images, method="features")
    return jax.lax.stop_gradient(out.astype(jnp.float32))

  def loss_fn(params, batch_stats, batch, rng):
    del rng
    return head_loss(head, params[HEAD], batch_stats, features(params, batch["images"][:, 0]),
                     batch["label"])

  def logits(state, images):
    return head.apply({"params": state["params"][HEAD], "batch_stats": state["batch_stats"]},
                      features(state["params"], images), train=False)

  def build(start_step):
    train_data, tx, schedule, mesh = common.training(config, start_step)
    steps_per_epoch = train_data.steps_per_epoch
    monitors = evaluation.build_monitors(config, mesh, steps_per_epoch=steps_per_epoch,
                                         logits_fn=logits)
    encoder_params = load_encoder()
    fast = {}
    if config.mode == "both" and not start_step:
      fast = fast_probe_results(config, classifier, encoder_params, mesh)

    def describe(num_params, start):
      return (f"linear probe of {paths.shown(config.init_from)}: frozen encoder, "
              f"{config.global_pool} feature ({feature_dim}), {info.num_classes} classes; data "
              f"{config.data.source} ({train_data.num_examples:,} train images)\n"
              f"global batch {config.batch_size}, LARS lr {optim.base_learning_rate(config):.4g}, "
              f"{config.epochs * steps_per_epoch} steps ({config.epochs} epochs x "
              f"{steps_per_epoch}), from step {start}")

    def finalize(summary):
      results = {"top1": summary.get("eval/top1"), "top5": summary.get("eval/top5"),
                 "split": config.data.eval_split, "epochs": config.epochs,
                 "num_eval_examples": summary.get("eval/num_examples"),
                 "init_from": str(config.init_from), **fast}
      return common.with_config(dict(summary, **results), config)

    return engine.Task(
        config=config, train_data=train_data, total_steps=config.epochs * steps_per_epoch,
        init_state=init_state, loss_fn=loss_fn, tx=tx, schedule=schedule, describe=describe,
        monitors=monitors, summary_file="results.json", finalize=finalize,
        after_init=lambda state, shardings: common.put_encoder(state, shardings, encoder_params,
                                                               config.global_pool))

  return engine.Program(config, abstract_state=lambda: common.state_shapes(config, init_state),
                        build=build)


def fast_probe_results(config, classifier, encoder_params, mesh) -> dict:
  """{'fast_top1', 'fast_top5'}: the head trained on the train split's cached features (eval
  recipe, no augmentation) with the probe's own optimizer, schedule, epochs and batch size."""
  started = time.time()
  if jax.process_index() == 0:  # before the feature extraction's first compile: seconds of quiet
    print(f"fast linear probe of {paths.shown(config.init_from)}: features of "
          f"{config.data.source} {config.data.train_split} and {config.data.eval_split} (no "
          f"augmentation), then the head for {config.epochs} epochs", flush=True)
  fresh = classifier.init(jax.random.PRNGKey(config.seed), common.sample_images(classifier))
  params = common.with_encoder(jax.device_get(fresh["params"]), encoder_params, config.global_pool)
  params = {k: v for k, v in params.items() if k != "head"}  # features only
  params = jax.device_put(params, sharding.tree_shardings(params, mesh, config.sharding.rules,
                                                          config.sharding.min_size))
  embed = jax.jit(lambda p, batch: (classifier.apply({"params": p}, batch["images"][:, 0],
                                                     method="features").astype(jnp.float32),
                                    batch["label"], batch["valid"]),
                  out_shardings=sharding.replicated(mesh))

  def extract(split):
    pipeline = data.build_eval_pipeline(config.data, split=split,
                                        global_batch_size=config.batch_size)
    return knn.features_of(embed, params, pipeline, mesh)

  train_features, train_labels = extract(config.data.train_split)
  eval_features, eval_labels = extract(config.data.eval_split)
  head = ProbeHead(classifier.num_classes, config.head_init_std)
  settings = head_settings(config.epochs, config.warmup_epochs, config.blr, config.batch_size,
                           config.seed, config.optim)
  head_rng = jax.random.split(jax.random.PRNGKey(config.seed))[1]
  state = train_head_on_features(settings, head, head_rng, train_features, train_labels, mesh)
  scores = evaluate_head_on_features(head, state, eval_features, eval_labels)
  seconds = round(time.time() - started, 1)
  if jax.process_index() == 0:
    print(f"fast linear probe (cached features, no augmentation): top1 {scores['top1']:.4f} top5 "
          f"{scores['top5']:.4f} on {len(eval_labels)} {config.data.eval_split} examples "
          f"({seconds} s)", flush=True)
  return {"fast_top1": scores["top1"], "fast_top5": scores["top5"], "fast_seconds": seconds}


def run(config, workdir: str) -> dict:
  """The linear probe as `config.mode` says; returns what WORKDIR/results.json holds."""
  if config.mode != "fast":
    return engine.run(program(config), workdir)
  config, _, classifier, load_encoder = parts(config)
  workdir = paths.absolute(workdir)
  checkpointing.check_writable(workdir)
  results = dict(fast_probe_results(config, classifier, load_encoder(),
                                    sharding.make_mesh(config.mesh)),
                 split=config.data.eval_split, epochs=config.epochs,
                 init_from=str(config.init_from))
  if jax.process_index() == 0:
    checkpointing.write_config(workdir, config)
    checkpointing.write_text_atomically(epath.Path(workdir) / "results.json", json.dumps(
        common.with_config(results, config), indent=2, sort_keys=True))
  return results
