"""Orbax checkpoints of the train state in WORKDIR/checkpoints, plus the run's config.json.

Each checkpoint step holds the item 'state' (the train state) and, when the caller passes one,
'data': the input pipeline's JSON state at that step (data.TrainPipeline.checkpoint_state).

Crash safety comes from Orbax: a step is written to `<step>.orbax-checkpoint-tmp*` and renamed to
`<step>` once complete, so a killed save leaves only a tmp directory, which `latest_step` never
returns and which the next (writable) Checkpointer deletes. Old steps are deleted only after a new
one is complete. config.json and summary.json are replaced atomically.
"""
import contextlib
import json
import os

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from sjmae_jax import console, paths
from sjmae_jax.sharding import path_str

CONFIG_FILE = "config.json"

# Keys that may differ between the run that wrote a checkpoint and the run resuming it without
# changing any array shape; left out when naming the keys behind a shape mismatch.
RESUMABLE_KEY_PREFIXES = (
    "arg", "batch_size", "blr", "checkpoint", "compute_dtype", "data", "debug", "distributed",
    "epochs", "grad_accum_steps", "init_from", "log_every_steps", "lr", "mesh", "min_lr",
    "nonfinite", "picture_every_steps", "seed", "sharding", "stop_after_minutes", "stop_at_step",
    "warmup_epochs")


class WorkdirError(OSError):
  """The workdir cannot be written (permissions, a file in the way, disk full); one-line message."""


class IncompatibleCheckpointError(ValueError):
  """The workdir's checkpoints hold a train state of other shapes than this config's."""


class Checkpointer:
  """CheckpointManager of WORKDIR/checkpoints with the items 'state' and (optional) 'data' (the
  input pipeline's position) and 'run' (the run's own bookkeeping: wall time over its segments).

  Creates nothing until the first save. `read_only=True` opens a workdir for reading only (no tmp
  directory cleanup, no saves): for looking at a run before deciding to write to it, or for
  loading another run's weights.
  """

  def __init__(self, workdir, *, max_to_keep: int = 3, save_every_steps: int = 1000,
               async_save: bool = True, read_only: bool = False):
    if read_only:
      options = ocp.CheckpointManagerOptions(
          read_only=True, create=False, save_interval_steps=0, max_to_keep=None)
    else:
      options = ocp.CheckpointManagerOptions(
          max_to_keep=max_to_keep, save_interval_steps=save_every_steps,
          enable_async_checkpointing=async_save, cleanup_tmp_directories=True, create=False)
    self.directory = epath.Path(paths.absolute(workdir)) / "checkpoints"  # Orbax: absolute only
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                       "run": ocp.JsonCheckpointHandler()})
    self._created = read_only or self.directory.exists()
    self._step_in_flight = None

  def latest_step(self):
    return self.manager.latest_step()

  def should_save(self, step: int) -> bool:
    """Whether the save policy (every `save_every_steps`, and a first one) saves at `step`."""
    return self.manager.should_save(step)

  def save(self, step: int, state, *, force: bool = False, data_state: dict | None = None,
           run_state: dict | None = None) -> bool:
    """Starts writing `state` (and the input pipeline's JSON `data_state`, the run's JSON
    `run_state`) as checkpoint `step` if the save policy or `force` says so (async: `wait` for it
    to be complete). Returns whether it saves."""
    if not force and not self.should_save(step):
      return False
    self.wait()  # a failed earlier save is reported as that step's
    if not self._created:
      self.directory.mkdir(parents=True, exist_ok=True)
      self._created = True
    with self._write_errors_as_workdir_error(step):
      items = {"state": ocp.args.StandardSave(state)}
      if data_state is not None:
        items["data"] = ocp.args.JsonSave(data_state)
      if run_state is not None:
        items["run"] = ocp.args.JsonSave(run_state)
      self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    self._step_in_flight = step
    return True

  def restore(self, step: int, abstract_state):
    restored = self.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    return restored["state"]

  def data_state(self, step: int) -> dict | None:
    """The input pipeline's state saved with checkpoint `step`; None for a checkpoint without one."""
    return self._json_item(step, "data")

  def run_state(self, step: int) -> dict | None:
    """The run's bookkeeping saved with checkpoint `step`; None for a checkpoint without it."""
    return self._json_item(step, "run")

  def _json_item(self, step: int, name: str) -> dict | None:
    if name not in self.manager.item_metadata(step).keys():
      return None
    restored = self.manager.restore(step, args=ocp.args.Composite(**{name: ocp.args.JsonRestore()}))
    return restored[name]

  def abstract_state(self, step: int, sharding=None):
    """The stored train state's shapes and dtypes (ShapeDtypeStructs on `sharding`, default one
    local device), read from the checkpoint's metadata."""
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype,
                                                          sharding=sharding),
                        self.manager.item_metadata(step)["state"])

  def array_metadata(self, step: int) -> dict:
    """{'params/encoder/...': (shape, dtype name)} of the arrays stored at `step`."""
    return shapes_by_path(self.manager.item_metadata(step)["state"])

  def wait(self) -> None:
    with self._write_errors_as_workdir_error(self._step_in_flight):
      self.manager.wait_until_finished()
    self._step_in_flight = None

  def close(self) -> None:
    with self._write_errors_as_workdir_error(self._step_in_flight):
      self.manager.close()

  @contextlib.contextmanager
  def _write_errors_as_workdir_error(self, step):
    """An OS-level write failure (disk full, ...) -> one WorkdirError line naming the step, the
    reason and the latest complete checkpoint; other errors pass through."""
    try:
      yield
    except WorkdirError:
      raise
    except Exception as error:
      reason = console.os_error_reason(error)
      if reason is None:
        raise
      complete = self.manager.all_steps(read=True)
      kept = f"latest complete: step {max(complete)}" if complete else "none complete yet"
      raise WorkdirError(
          f"cannot write checkpoint step {step} in {self.directory}: {reason}; existing "
          f"checkpoints are untouched ({kept}); rerun the same command to resume once this is "
          f"fixed") from error


def shapes_by_path(tree) -> dict:
  return {path_str(path): (tuple(leaf.shape), np.dtype(leaf.dtype).name)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}



def is_local(path) -> bool:
  return "://" not in str(path)


def check_writable(workdir) -> None:
  """One WorkdirError line if the workdir (or, when it does not exist yet, the directory it would
  be created in) cannot be written. Writes nothing. Remote paths (gs://...) are not checked."""
  workdir = epath.Path(workdir)
  if not is_local(workdir):
    return
  existing = next(path for path in (workdir, *workdir.parents) if path.exists())
  if not existing.is_dir():
    raise WorkdirError(f"workdir {workdir}: {existing} is not a directory")
  to_check = [existing]
  if existing == workdir:
    to_check += [path for path in (workdir / "checkpoints", workdir / "tensorboard") if path.exists()]
  for path in to_check:
    if not os.access(path, os.W_OK | os.X_OK):
      where = "" if path == workdir else f" ({path})"
      raise WorkdirError(f"workdir {workdir} is not writable{where}: permissions or a read-only "
                         f"file system")


def check_compatible(checkpointer, step: int, abstract_state, workdir, config) -> None:
  """IncompatibleCheckpointError (one line) if checkpoint `step` does not hold arrays of the
  shapes and dtypes of `abstract_state`, naming the config keys that differ from the workdir's
  config.json with both values, and the first differing array."""
  stored = checkpointer.array_metadata(step)
  wanted = shapes_by_path(abstract_state)
  if stored == wanted:
    return
  # Name a parameter rather than an optimizer slot when one differs.
  differing_arrays = sorted((name for name in stored.keys() | wanted.keys()
                             if stored.get(name) != wanted.get(name)),
                            key=lambda name: (not name.startswith("params/"), name))
  first = differing_arrays[0]
  describe = lambda entry: "absent" if entry is None else f"{entry[0]} {entry[1]}"
  array_diff = (f"{first} is {describe(stored.get(first))} there vs {describe(wanted.get(first))} "
                f"here ({len(differing_arrays)} array(s) differ)")
  key_diff = ""
  config_path = epath.Path(workdir) / CONFIG_FILE
  if config_path.exists():
    saved = flatten(json.loads(config_path.read_text()))
    current = flatten(json.loads(config.to_json_best_effort()))
    keys = sorted((key for key in saved.keys() | current.keys()
                   if saved.get(key) != current.get(key)
                   and not key.startswith(RESUMABLE_KEY_PREFIXES)),
                  key=lambda key: (not key.startswith(("method", "model.", "decoder.")), key))
    value = lambda flat, key: repr(flat[key]) if key in flat else "absent"
    named = [f"{key}: {value(saved, key)} there vs {value(current, key)} here" for key in keys[:4]]
    if len(keys) > 4:
      named.append(f"{len(keys) - 4} more key(s)")
    key_diff = "".join(f"{entry}; " for entry in named)
  raise IncompatibleCheckpointError(
      f"workdir {workdir} holds checkpoints (step {step}) of a different model: {key_diff}"
      f"{array_diff}; use another --workdir, or the workdir's settings ({config_path})")


def flatten(tree: dict, prefix: str = "") -> dict:
  """{'a': {'b': 1}} -> {'a.b': 1}."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def write_text_atomically(path, text: str) -> None:
  """Write via a temporary file and a rename, so a kill or a full disk never leaves a partial
  file (and a failed write leaves the old one). OSError -> WorkdirError."""
  path = epath.Path(path)
  if not is_local(path):
    path.write_text(text)
    return
  temp = path.parent / f".{path.name}.{os.getpid()}.tmp"
  try:
    try:
      with open(temp, "w") as f:
        f.write(text)
      os.replace(temp, path)
    except BaseException:
      temp.unlink(missing_ok=True)
      raise
  except OSError as e:
    raise WorkdirError(f"cannot write {path}: {os.strerror(e.errno) if e.errno else e}") from e


def write_config(workdir, config) -> None:
  if jax.process_index() == 0:
    path = epath.Path(workdir)
    path.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path / CONFIG_FILE, config.to_json_best_effort(indent=2, sort_keys=True))


def read_config(workdir) -> ml_collections.ConfigDict:
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(f"{path}: no config.json; is {workdir} a sjmae_jax workdir?")
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def load_params(workdir, step=None):
  """(params, config) of the latest (or given) checkpoint of a workdir, on host.

  The arrays' shapes come from the checkpoint itself, so this needs nothing of the program that
  wrote it; whatever mesh or number of hosts wrote it, arrays are restored onto one device.
  Reads only: the workdir is not modified.
  """
  config = read_config(workdir)
  checkpointer = Checkpointer(workdir, read_only=True)
  step = checkpointer.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"{epath.Path(workdir) / 'checkpoints'}: no checkpoint to load")
  state = checkpointer.restore(step, checkpointer.abstract_state(step))
  checkpointer.close()
  return jax.device_get(state["params"]), config
