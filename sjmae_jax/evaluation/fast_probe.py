"""The fast linear probe: a linear head (BatchNorm without affine + Linear, MAE's probe head)
trained with LARS on cached features. Used by the linear probe's 'fast' mode and as the
`fast_linear_probe` monitor of pretraining."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sjmae_jax import config_lib, data, engine, optim, sharding
from sjmae_jax.evaluation import knn
from sjmae_jax.evaluation.classification import topk_correct
from sjmae_jax.models.heads import BatchNorm
from sjmae_jax.models.vit import timm_trunc_normal
from sjmae_jax.objectives.losses import softmax_cross_entropy


class ProbeHead(nn.Module):
  """BatchNorm1d(affine=False, eps=1e-6) then Linear (MAE's linear-probe head)."""
  num_classes: int
  init_std: float = 0.01

  @nn.compact
  def __call__(self, features, *, train: bool):
    x = BatchNorm(epsilon=1e-6, use_scale=False, use_bias=False, name="bn")(features, train=train)
    return nn.Dense(self.num_classes, kernel_init=timm_trunc_normal(self.init_std), name="head")(x)


def head_loss(head, params, batch_stats, features, labels):
  """(loss, ({'train/top1'}, new batch_stats)) of the probe head on features."""
  logits, updated = head.apply({"params": params, "batch_stats": batch_stats}, features,
                               train=True, mutable=["batch_stats"])
  loss, accuracy = softmax_cross_entropy(logits, labels)
  return loss, ({"train/top1": accuracy}, updated["batch_stats"])


def head_settings(epochs: int, warmup_epochs: float, blr: float, batch_size: int,
                  seed: int = 0, optim_config=None) -> ml_collections.ConfigDict:
  """The schedule / optimizer keys of a head trained on cached features (LARS by default)."""
  return ml_collections.ConfigDict(dict(
      epochs=epochs, warmup_epochs=warmup_epochs, blr=blr, lr=0.0, min_lr=0.0,
      batch_size=batch_size, seed=seed,
      optim=optim_config or config_lib.optim_config(name="lars", weight_decay=0.0, lr_mults=())))


def train_head_on_features(settings, head, rng, features, labels, mesh):
  """Train the probe head on cached features: examples reshuffled every epoch (permutation from
  the seed), remainder dropped. Returns {'params', 'batch_stats'}."""
  batch_size = settings.batch_size
  steps_per_epoch = len(labels) // batch_size
  if not steps_per_epoch:
    raise ValueError(f"config batch_size: {batch_size} is larger than the {len(labels)} train "
                     f"examples of the fast probe")
  tx, schedule = optim.make_optimizer(settings, steps_per_epoch)
  variables = head.init(rng, jnp.zeros((2, features.shape[1]), jnp.float32), train=False)
  state = {"params": variables["params"], "batch_stats": variables["batch_stats"], "rng": rng}
  replicated = sharding.replicated(mesh)
  state = jax.device_put(engine.with_bookkeeping(state, tx), replicated)
  step_fn = jax.jit(engine.make_train_step(
      lambda params, batch_stats, batch, _: head_loss(head, params, batch_stats, batch["features"],
                                                      batch["label"]),
      tx, schedule, mesh), donate_argnums=(0,), out_shardings=replicated)
  process, count = jax.process_index(), jax.process_count()
  local = batch_size // count
  order_rng = np.random.default_rng(settings.seed)
  for _ in range(settings.epochs):
    order = order_rng.permutation(len(labels))[:steps_per_epoch * batch_size]
    for indices in order.reshape(steps_per_epoch, batch_size):
      mine = indices[process * local:(process + 1) * local]
      state, _ = step_fn(state, sharding.global_batch(
          {"features": features[mine], "label": labels[mine]}, mesh))
  return {"params": state["params"], "batch_stats": state["batch_stats"]}


def evaluate_head_on_features(head, state, features, labels) -> dict:
  logits = jax.jit(lambda s, f: head.apply(s, f, train=False))(state, jnp.asarray(features))
  labels = jnp.asarray(labels)
  counts = topk_correct(logits, labels, jnp.ones_like(labels, bool))
  return {"top1": float(counts[1]) / len(labels), "top5": float(counts[5]) / len(labels)}


class FastProbeMonitor:
  """The `fast_linear_probe` monitor: a ProbeHead trained with LARS on the cached features of a
  class-balanced subset of the train split (num_train, eval recipe), scored on (num_eval of) the
  eval split: `fast_probe/top1`, `fast_probe/top5`. Spec keys: epochs, warmup_epochs, blr,
  batch_size (of the head's steps), num_train, num_eval, seed."""

  def __init__(self, spec, data_config, features_fn, mesh, *, batch_size: int, every_steps: int):
    self.every_steps = every_steps
    self.mesh = mesh
    self.prefix = spec.get("prefix", "fast_probe/")
    self.settings = head_settings(spec.epochs, spec.warmup_epochs, spec.blr, spec.batch_size,
                                  spec.get("seed", 0))
    self.head = ProbeHead(data.dataset_info(data_config).num_classes)
    train_split = knn.balanced_subset(data_config, data_config.train_split,
                                      spec.get("num_train", 0))
    eval_split = knn.balanced_subset(data_config, spec.get("split", "") or data_config.eval_split,
                                     spec.get("num_eval", 0))
    self.train_data = data.build_eval_pipeline(data_config, split=train_split,
                                               global_batch_size=batch_size)
    self.eval_data = data.build_eval_pipeline(data_config, split=eval_split,
                                              global_batch_size=batch_size)
    self._embed = jax.jit(
        lambda state, batch: (features_fn(state, batch["images"][:, 0]), batch["label"],
                              batch["valid"]), out_shardings=sharding.replicated(mesh))

  def __call__(self, state) -> dict:
    train_features, train_labels = knn.features_of(self._embed, state, self.train_data, self.mesh)
    eval_features, eval_labels = knn.features_of(self._embed, state, self.eval_data, self.mesh)
    head_state = train_head_on_features(self.settings, self.head,
                                        jax.random.PRNGKey(self.settings.seed), train_features,
                                        train_labels, self.mesh)
    scores = evaluate_head_on_features(self.head, head_state, eval_features, eval_labels)
    return {f"{self.prefix}{k}": v for k, v in scores.items()}
