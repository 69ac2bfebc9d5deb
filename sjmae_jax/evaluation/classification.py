"""Top-1 of an objective's own classifier (`classify(images)`, e.g. SSAT) on the eval split.

One deterministic pass over `config.data.eval_split` (padding excluded), every epoch by default,
reported as `eval/top1`. Counting happens inside one jitted function over the global batch, so
every process gets the same global count.
"""
import jax
import jax.numpy as jnp

from sjmae_jax import data, sharding


class ClassificationMonitor:

  def __init__(self, model, mesh, eval_pipeline, every_steps: int):
    self.every_steps = max(int(every_steps), 1)
    self.mesh = mesh
    self.pipeline = eval_pipeline

    def count(params, batch_stats, batch):
      logits = model.apply({"params": params, "batch_stats": batch_stats},
                           batch["images"][:, 0], method="classify")
      valid = batch["valid"]
      correct = jnp.sum((jnp.argmax(logits, axis=-1) == batch["label"]) & valid)
      return correct, jnp.sum(valid)
    self._count = jax.jit(count, out_shardings=sharding.replicated(mesh))

  def __call__(self, state) -> dict:
    correct, total = 0, 0
    for local_batch in self.pipeline:
      batch = sharding.global_batch(local_batch, self.mesh)
      batch_correct, batch_total = self._count(state["params"], state["batch_stats"], batch)
      correct += int(batch_correct)
      total += int(batch_total)
    return {"eval/top1": correct / max(total, 1)}


def build(config, model, mesh) -> list:
  """[ClassificationMonitor] for objectives with a classifier (`classify`), else []."""
  if not hasattr(model, "classify"):
    return []
  batch_size = config.batch_size // config.grad_accum_steps  # divisible by the device count
  info = data.dataset_info(config.data)
  steps_per_epoch = max(info.num_examples(config.data.train_split) // config.batch_size, 1)
  pipeline = data.build_eval_pipeline(config.data, split=config.data.eval_split,
                                      global_batch_size=batch_size)
  return [ClassificationMonitor(model, mesh, pipeline, every_steps=steps_per_epoch)]
