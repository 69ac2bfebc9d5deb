"""sjmae_jax.plan: per-device state bytes equal those of the real sharded arrays; residual count."""
import contextlib
import io
import json
import os
import re
import subprocess
import sys

import jax
import jax.ad_checkpoint
import numpy as np
import pytest

from sjmae_jax import plan, trainer
from tests.helpers import REPO, load_config, tiny_config

VIT_B_MAE = "model=vit_base,data=imagenet2012"
MESHES = ((4, 2), (2, 4))  # (data, fsdp) on 8 devices

# Runs on 8 forced CPU devices: places every array of the ViT-B MAE train state on the mesh with
# the shardings train.py computes for it (sharding.tree_shardings of the state's eval_shape), one
# array at a time (the whole state x 8 devices would take ~6 GB), and sums, per part of the state,
# the bytes of its largest addressable shard.
REAL_SHARDS = """
import functools, json, sys
import jax, numpy as np
from sjmae_jax import optim, sharding, trainer
from tests.helpers import load_config
assert jax.device_count() == 8, jax.devices()
results = {}
for data, fsdp in json.loads(sys.argv[1]):
  config = load_config("mae", sys.argv[2])
  config.unlock()
  config.mesh.data, config.mesh.fsdp = data, fsdp
  mesh = sharding.make_mesh(config.mesh)
  tx, _ = optim.make_optimizer(config, steps_per_epoch=1)
  init_fn = functools.partial(trainer.init_state, trainer.build_model(config), tx, config)
  abstract = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
  shardings = sharding.tree_shardings(abstract, mesh, config.sharding.rules,
                                      config.sharding.min_size)
  parts = {}
  for name in abstract:
    key = name if name in ("params", "opt_state") else "other"
    for leaf, leaf_sharding in zip(jax.tree.leaves(abstract[name]), jax.tree.leaves(shardings[name])):
      array = jax.device_put(np.zeros(leaf.shape, leaf.dtype), leaf_sharding)
      assert len(array.addressable_shards) == 8
      parts[key] = parts.get(key, 0) + max(s.data.nbytes for s in array.addressable_shards)
      del array
  results[f"{data}x{fsdp}"] = parts
print(json.dumps(results))
"""


def test_plan_state_bytes_equal_the_real_sharded_arrays_on_8_devices():
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8",
             TF_CPP_MIN_LOG_LEVEL="2")
  run = subprocess.run([sys.executable, "-c", REAL_SHARDS, json.dumps(MESHES), VIT_B_MAE], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  real = json.loads(run.stdout.strip().splitlines()[-1])

  config = load_config("mae", VIT_B_MAE)
  config.unlock()
  config.mesh.data, config.mesh.fsdp = MESHES[0]
  planned = plan.make_plan(config, 8)  # the command's numbers, for the first mesh
  assert (planned.data, planned.fsdp, planned.micro_batch) == (*MESHES[0], 4096 // 8)
  assert planned.num_params == 111_907_840
  assert planned.full_bytes["params"] == 4 * planned.num_params
  planned_state = {key: planned.per_device_bytes[key] for key in ("params", "opt_state", "other")}
  assert planned_state == real["4x2"]

  abstract_state = trainer.abstract_train_state(config)
  for data, fsdp in MESHES:
    per_device = plan.state_bytes(abstract_state, fsdp, config.sharding.rules,
                                  config.sharding.min_size)
    assert per_device == real[f"{data}x{fsdp}"], (data, fsdp)
    assert per_device["params"] < planned.full_bytes["params"] / fsdp * 1.01  # sharding did cut


def parse_printed_residuals(printed: str) -> int:
  """Bytes of the residuals listed by jax.ad_checkpoint.print_saved_residuals, less the inputs."""
  itemsize = {"f32": 4, "bf16": 2, "f16": 2, "i32": 4, "u32": 4, "i8": 1, "u8": 1, "bool": 1}
  total = 0
  for line in printed.strip().splitlines():
    if line.split(" ", 1)[1].startswith(("from the argument", "from a literal", "from a constant")):
      continue
    dtype, dims = re.match(r"(\w+)\[([\d,]*)\]", line).groups()
    total += itemsize[dtype] * int(np.prod([int(d) for d in dims.split(",") if d]))
  return total


@pytest.mark.parametrize("method", ["mae", "sjmae"])
def test_activation_residuals_match_jaxs_own_list(method):
  config = tiny_config(method)
  model = trainer.build_model(config)
  state = trainer.abstract_train_state(config)
  batch = jax.eval_shape(lambda: trainer.sample_batch(config, 4))

  def loss(params, batch_stats, batch, rng):
    (value, _), _ = model.apply({"params": params, "batch_stats": batch_stats}, batch, train=True,
                                rngs={"masking": rng, "dropout": rng}, mutable=["batch_stats"])
    return value

  def print_residuals(params, batch_stats, batch, rng):  # batch, batch_stats, rng: constants here
    jax.ad_checkpoint.print_saved_residuals(lambda p: loss(p, batch_stats, batch, rng), params)
    return 0

  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    jax.eval_shape(print_residuals, state["params"], state["batch_stats"], batch, state["rng"])
  assert plan.residual_bytes(config, model, state, 4) == parse_printed_residuals(printed.getvalue())


def test_activations_follow_the_micro_batch_and_compute_dtype():
  config = tiny_config("mae", batch_size=64)
  base = plan.make_plan(config, 1)
  config.grad_accum_steps = 2
  halved = plan.make_plan(config, 1)
  assert halved.micro_batch == base.micro_batch // 2 == 32
  assert halved.per_device_bytes["activations"] * 2 == base.per_device_bytes["activations"]
  assert halved.per_device_bytes["gradients"] == 2 * base.per_device_bytes["gradients"]  # + accumulator
  config.grad_accum_steps = 1
  config.compute_dtype = "bfloat16"
  bf16 = plan.make_plan(config, 1)
  assert bf16.per_device_bytes["activations"] < 0.75 * base.per_device_bytes["activations"]
  # bfloat16 keeps a 2-byte copy of (nearly) every weight for the backward pass; float32 does not.
  assert bf16.per_device_bytes["weight_copies"] > 0.45 * base.per_device_bytes["params"]
  assert base.per_device_bytes["weight_copies"] < 0.01 * base.per_device_bytes["params"]


def test_plan_command_line_takes_train_py_flags():
  args = [sys.executable, "-m", "sjmae_jax.plan", f"--config={REPO / 'configs' / 'mae.py'}",
          "--devices=8", "--config.mesh.fsdp=2", "--config.mesh.data=-1", "--config.batch_size=64",
          "--device_memory_gib=16"]
  run = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
  assert run.returncode == 0, run.stderr[-3000:]
  config = load_config("mae")
  config.unlock()
  config.mesh.data, config.mesh.fsdp, config.batch_size = -1, 2, 64
  assert run.stdout.strip() == plan.format_plan(plan.make_plan(config, 8), 16.0)
  assert "mesh data=4 x fsdp=2 (8 devices), 8 examples per device" in run.stdout
  assert "fits" in run.stdout

  bad = subprocess.run(args[:-1] + ["--config.batch_size=12"], cwd=REPO, capture_output=True,
                       text=True, timeout=600, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
  assert bad.returncode == 2
  assert "config batch_size: 12 is not divisible" in bad.stderr
