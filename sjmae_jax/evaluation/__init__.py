"""Evaluation: monitors run during pretraining, and the probe / fine-tune protocols.

A monitor is an object with `every_steps` (int) and `__call__(state) -> dict[str, float]`,
called by the trainer every `every_steps` steps and at the last step; its metrics go to
TensorBoard and summary.json.

  knn.py           weighted kNN top-1 of CLS features (monitor `knn/top1`, config.knn)
  linear_probe.py  MAE linear probe (frozen encoder, BN + linear head, LARS); eval_linprobe.py
  finetune.py      MAE fine-tuning (layer decay, mixup/cutmix, ...); eval_finetune.py
  lars.py, layer_decay.py, mixup.py   their building blocks
"""


def build_monitors(config, model, mesh) -> list:
  """The monitors `config` asks for (an empty list when none)."""
  from sjmae_jax.evaluation import knn  # late: evaluation is imported by the trainer
  monitors = []
  monitors += knn.build(config, model, mesh)
  from sjmae_jax.evaluation import classification  # eval/top1 of objectives with classify()
  monitors += classification.build(config, model, mesh)
  return monitors
