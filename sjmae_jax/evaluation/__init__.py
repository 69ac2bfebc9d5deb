"""Evaluation: monitors run during pretraining, and the probe / fine-tune protocols.

A monitor is an object with `every_steps` (int) and `__call__(state) -> dict[str, float]`,
called by the trainer every `every_steps` steps and at the last step; its metrics go to
TensorBoard and summary.json.
"""


def build_monitors(config, model, mesh) -> list:
  """The monitors `config` asks for (an empty list when none)."""
  return []
