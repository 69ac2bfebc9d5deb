"""Top-1 / top-5 of a run's logits on a split: the `classification` monitor.

One deterministic pass over the split (padding excluded); counting happens inside one jitted
function over the global batch, so every process gets the same global count. Used by fine-tuning
and the linear probe (their eval), and by pretraining objectives that classify (SSAT).
Spec keys: split ('' = data.eval_split), prefix ('eval/'), params ('params', or 'ema_params' for
fine-tuning's EMA).
"""
import jax
import jax.numpy as jnp

from sjmae_jax import data, sharding


def topk_correct(logits, labels, valid, ks=(1, 5)):
  """{k: number of valid examples whose label is among the k highest logits}."""
  rank = jnp.sum(logits > jnp.take_along_axis(logits, labels[:, None], axis=-1), axis=-1)
  return {k: jnp.sum((rank < k) & valid) for k in ks}


class ClassificationMonitor:

  def __init__(self, spec, data_config, logits_fn, mesh, *, batch_size: int, every_steps: int):
    self.every_steps = every_steps
    self.mesh = mesh
    self.prefix = spec.get("prefix", "eval/")
    params_key = spec.get("params", "params")
    split = spec.get("split", "") or data_config.eval_split
    self.pipeline = data.build_eval_pipeline(data_config, split=split, global_batch_size=batch_size)

    def count(state, batch):
      state = dict(state, params=state[params_key])
      logits = logits_fn(state, batch["images"][:, 0])
      correct = topk_correct(logits, batch["label"], batch["valid"])
      return correct[1], correct[5], jnp.sum(batch["valid"])
    self._count = jax.jit(count, out_shardings=sharding.replicated(mesh))

  def __call__(self, state) -> dict:
    correct1 = correct5 = total = 0
    for local_batch in self.pipeline:
      batch = sharding.global_batch(local_batch, self.mesh)
      c1, c5, count = jax.device_get(self._count(state, batch))
      correct1, correct5, total = correct1 + int(c1), correct5 + int(c5), total + int(count)
    return {f"{self.prefix}top1": correct1 / max(total, 1),
            f"{self.prefix}top5": correct5 / max(total, 1), f"{self.prefix}num_examples": total}
