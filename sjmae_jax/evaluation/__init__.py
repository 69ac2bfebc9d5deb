"""Evaluation: the monitors of a training run, and the linear-probe / fine-tune programs.

A monitor is declared in the config (`config.monitors.<name> = dict(type=..., every_epochs=...)`)
and is an object with `every_steps` (int, 0 = only at the end) and `__call__(state) ->
dict[str, float]`; the engine calls it every `every_steps` steps and at the end of the schedule,
and its metrics go to TensorBoard and the summary. Types:

  knn                weighted kNN top-1 of features (knn.py): `knn/top1`
  classification     top-1 / top-5 of logits on a split (classification.py): `eval/top1`, ...
  fast_linear_probe  a linear head trained on cached features (fast_probe.py): `fast_probe/top1`

  linear_probe.py    MAE linear probe (frozen encoder, BN + linear head, LARS); eval_linprobe.py
  finetune.py        MAE fine-tuning (layer decay, mixup/cutmix, ...); eval_finetune.py
  common.py, mixup.py  their building blocks
"""
from sjmae_jax import config_lib
from sjmae_jax.evaluation import classification, fast_probe, knn


def build_monitors(config, mesh, *, steps_per_epoch: int, features_fn=None, logits_fn=None) -> list:
  """The monitors of `config.monitors` that are on (every_* > 0, or `at_end`).

  features_fn(state, images) -> (B, D) float32 features (knn, fast_linear_probe);
  logits_fn(state, images) -> (B, C) logits (classification). A monitor whose function the
  program has not got fails here, in one line.
  """
  builders = {"knn": knn.KnnMonitor, "classification": classification.ClassificationMonitor,
              "fast_linear_probe": fast_probe.FastProbeMonitor}
  monitors = []
  for name, spec in config.get("monitors", {}).items():
    if spec.type not in builders:
      raise ValueError(f"config monitors.{name}.type: {spec.type!r} is not one of "
                       f"{sorted(builders)}")
    every = config_lib.every_steps(spec, "every", steps_per_epoch=steps_per_epoch,
                                   batch_size=config.batch_size)
    if not every and not spec.get("at_end", False):
      continue
    needs = logits_fn if spec.type == "classification" else features_fn
    if needs is None:
      what = "logits (a classifier)" if spec.type == "classification" else "features"
      raise ValueError(f"config monitors.{name}: a {spec.type} monitor needs {what}, which this "
                       f"run has not got (config method {config.get('method')!r})")
    batch_size = spec.get("batch_size", 0) or config.batch_size // config.grad_accum_steps
    if batch_size % mesh.size:
      raise ValueError(f"config monitors.{name}.batch_size: {batch_size} is not divisible by the "
                       f"{mesh.size} devices")
    monitors.append(builders[spec.type](spec, config.data, needs, mesh, batch_size=batch_size,
                                        every_steps=every))
  return monitors
