"""Device mesh (data + fsdp axes), parameter sharding by name regex, global batch assembly.

The batch is split over both axes (every device sees its own examples); parameters and optimizer
state are sharded along `fsdp` by rule and replicated along `data`. With fsdp=1 this is plain
data parallelism. Rules are (regex, strategy) pairs matched against 'a/b/c' parameter paths, the
first match wins: 'fsdp' shards the largest dimension divisible by the fsdp size (replicates when
none is, or when the array is smaller than `min_size`), 'replicate' replicates.
"""
import re
from typing import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXES = ("data", "fsdp")


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, int]:
  """(data, fsdp) axis sizes for `num_devices`; -1 (at most one) takes the remaining devices."""
  data, fsdp = int(mesh_config.data), int(mesh_config.fsdp)
  if data == -1 and fsdp == -1:
    raise ValueError("config mesh: only one of data/fsdp may be -1")
  if data == -1:
    data = num_devices // fsdp
  if fsdp == -1:
    fsdp = num_devices // data
  if data * fsdp != num_devices or data < 1 or fsdp < 1:
    raise ValueError(f"config mesh: data={mesh_config.data} x fsdp={mesh_config.fsdp} does not "
                     f"match the {num_devices} available devices")
  return data, fsdp


def make_mesh(mesh_config) -> Mesh:
  """mesh_config.data / .fsdp: axis sizes; -1 (at most one) takes the remaining devices."""
  data, fsdp = mesh_shape(mesh_config, jax.device_count())
  devices = mesh_utils.create_device_mesh((data, fsdp), allow_split_physical_axes=True)
  return Mesh(devices, DATA_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def path_str(path) -> str:
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def _spec_for(shape, strategy: str, fsdp_size: int, min_size: int) -> P:
  if strategy == "replicate" or fsdp_size == 1 or int(np.prod(shape)) < min_size:
    return P()
  if strategy != "fsdp":
    raise ValueError(f"config sharding.rules: unknown strategy {strategy!r} (use 'fsdp' or 'replicate')")
  for axis in np.argsort(shape)[::-1]:
    if shape[axis] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[axis] = "fsdp"
      return P(*spec)
  return P()


def partition_specs(abstract_tree, fsdp_size: int, rules: Sequence, min_size: int = 2 ** 14):
  """PartitionSpec of every leaf of `abstract_tree` for an fsdp axis of `fsdp_size` devices.

  Pure: needs no mesh and no devices (sjmae_jax.plan uses it to size meshes it does not have).
  """
  compiled = [(re.compile(pattern), strategy) for pattern, strategy in rules]

  def leaf_spec(path, leaf):
    name = path_str(path)
    shape = getattr(leaf, "shape", ())
    for pattern, strategy in compiled:
      if pattern.fullmatch(name):
        return _spec_for(shape, strategy, fsdp_size, min_size)
    return P()

  return jax.tree_util.tree_map_with_path(leaf_spec, abstract_tree)


def tree_shardings(abstract_tree, mesh: Mesh, rules: Sequence, min_size: int = 2 ** 14):
  """NamedShardings for every leaf of `abstract_tree` (arrays or ShapeDtypeStructs)."""
  specs = partition_specs(abstract_tree, mesh.shape["fsdp"], rules, min_size)
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs,
                      is_leaf=lambda x: isinstance(x, P))


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """Per-process NumPy batch -> global jax.Arrays split over (data, fsdp)."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)
