"""Orbax checkpoints of the train state in WORKDIR/checkpoints, plus the run's config.json.

The data position is not stored: the input pipeline derives it from the step.
"""
import json

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

CONFIG_FILE = "config.json"


class Checkpointer:
  def __init__(self, workdir, *, max_to_keep: int = 3, save_every_steps: int = 1000,
               async_save: bool = True):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, save_interval_steps=save_every_steps,
        enable_async_checkpointing=async_save, cleanup_tmp_directories=True, create=True)
    self.directory = epath.Path(workdir) / "checkpoints"
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state",))

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, step: int, state, *, force: bool = False) -> bool:
    return self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)),
                             force=force)

  def restore(self, step: int, abstract_state):
    restored = self.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    return restored["state"]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


def write_config(workdir, config) -> None:
  if jax.process_index() == 0:
    path = epath.Path(workdir)
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_FILE).write_text(config.to_json_best_effort(indent=2, sort_keys=True))


def read_config(workdir) -> ml_collections.ConfigDict:
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(f"{path}: no config.json; is {workdir} a sjmae_jax workdir?")
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def load_params(workdir, step=None):
  """(params, config) of the latest (or given) checkpoint of a pretraining workdir, on host.

  Works whatever mesh or number of hosts wrote the checkpoint: arrays are restored onto one device.
  """
  from sjmae_jax import trainer  # late import: trainer imports this module
  config = read_config(workdir)
  checkpointer = Checkpointer(workdir, async_save=False)
  step = checkpointer.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"{epath.Path(workdir) / 'checkpoints'}: no checkpoint to load")
  on_one_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=on_one_device),
                          trainer.abstract_train_state(config))
  state = checkpointer.restore(step, abstract)
  checkpointer.close()
  return jax.device_get(state["params"]), config
