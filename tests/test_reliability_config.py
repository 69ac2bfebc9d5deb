"""Bad configs fail before compile with one line and write nothing; the non-finite step policies."""
import re
import subprocess

import jax
import numpy as np
import pytest

from sjmae_jax import config_lib, data, objectives, optim, sharding, trainer
from tests.helpers import REPO, tiny_config, train_command, train_env


def error_lines(stderr: str) -> list:
  """The `error:` lines of stderr; there must be one at most, and it must be the last line."""
  lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
  assert not lines or stderr.strip().splitlines()[-1] == lines[-1], stderr[-3000:]
  return lines


# (config with arg, overrides, forced devices, what the one error line must say); more cases of
# values that parse but are impossible are in test_validate_rejects_impossible_values.
BAD_CONFIGS = {
    "unknown key": ("mae", {"nope": 1}, 1, "--config.nope: unknown config key 'nope'"),
    "misspelt nested key": ("mae", {"mae.mask_ration": 0.5}, 1,
                            "unknown config key 'mask_ration' (did you mean 'mask_ratio'?)"),
    "wrong type": ("mae", {"batch_size": "big"}, 1, "--config.batch_size=big"),
    "unknown config arg": ("mae:size=3", {}, 1, "config arg 'size': unknown key"),
    "mask ratio 1": ("mae", {"mae.mask_ratio": 1.0}, 1, "config mae.mask_ratio: 1.0 must be in [0, 1)"),
    "batch vs devices": ("mae", {"batch_size": 30}, 4, "batch_size: 30 is not divisible"),
    "image vs patch": ("mae", {"model.patch_size": 3}, 1, "img_size: 16 is not divisible"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
@pytest.mark.slow
def test_bad_config_fails_with_one_line_and_writes_nothing(tmp_path, case):
  config, overrides, devices, expected = BAD_CONFIGS[case]
  workdir = tmp_path / "run"
  result = subprocess.run(train_command(workdir, config, {**overrides, "stop_at_step": 1}),
                          env=train_env(devices), cwd=REPO, capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 2, result.stderr[-3000:]
  assert len(error_lines(result.stderr)) == 1, result.stderr[-3000:]
  assert expected in error_lines(result.stderr)[0]
  assert "Traceback" not in result.stderr
  assert not workdir.exists()


def test_validate_rejects_impossible_values():
  cases = {
      "sjmae.mask_ratio_jigsaw: 1.5": {"sjmae.mask_ratio_jigsaw": 1.5},
      "keeps no patch": {"mae.mask_ratio": 0.97},  # 16 patches: keeps int(0.48) = 0
      "batch_size: 32 is not divisible by grad_accum_steps (3)": {"grad_accum_steps": 3},
      "config mesh: data=3 x fsdp=1": {"mesh.data": 3},
      "config nonfinite: 'ignore'": {"nonfinite": "ignore"},
      "model.embed_dim: 32 is not divisible": {"model.num_heads": 5},
      "data.views": {"data.views": ["mae", "nope"]},
      "data.img_size": {"data.img_size": 32},
      "decoder.embed_dim": {"decoder.num_heads": 3},
      "warmup_epochs": {"warmup_epochs": -1.0},
      "checkpoint.every_steps": {"checkpoint.every_steps": 0},
      "log_every_steps": {"log_every_steps": 0},
      "optim.b1/b2": {"optim.b2": 1.0},
      "sharding.rules": {"sharding.rules": ((".*", "shard"),)},
      "debug.poison_step": {"debug.poison_step": -1},
  }
  for expected, overrides in cases.items():
    config = tiny_config("sjmae" if "sjmae" in expected else "mae", **overrides)
    with pytest.raises(ValueError, match=re.escape(expected)):
      config_lib.validate(config, num_devices=1)  # the run's keys
      objectives.check(config)  # the objective's: encoder, decoder, method block
  config_lib.validate(tiny_config("mae"), num_devices=8)  # the defaults pass
  config_lib.validate(tiny_config("sjmae"), num_devices=2)


def poisoned_steps(skip_nonfinite):
  """(state before, after the poisoned step 2, after the clean step 3) of the tiny MAE."""
  config = tiny_config("mae")
  mesh = sharding.make_mesh(config.mesh)
  model = trainer.build_model(config)
  tx, schedule = optim.make_optimizer(config, 10)
  state = trainer.init_state(model, tx, config, jax.random.PRNGKey(0))
  pipeline = iter(data.build_train_pipeline(config.data, global_batch_size=32, seed=0))
  step = jax.jit(trainer.make_train_step(model, tx, schedule, mesh, skip_nonfinite=skip_nonfinite,
                                         poison_step=2))
  state, _ = step(state, next(pipeline))  # step 1: lr 0 (warmup), moves the optimizer count on
  after_poison, metrics = step(state, next(pipeline))
  assert not np.isfinite(float(metrics["loss"]))
  after_clean, clean_metrics = step(after_poison, next(pipeline))
  return state, (after_poison, metrics), (after_clean, clean_metrics)


def test_skip_policy_drops_the_poisoned_update_and_counts_it():
  before, (after_poison, metrics), (after_clean, clean_metrics) = poisoned_steps(True)
  assert int(after_poison["step"]) == 2 and int(metrics["nonfinite_steps"]) == 1
  for a, b in zip(jax.tree.leaves(before["params"]), jax.tree.leaves(after_poison["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for a, b in zip(jax.tree.leaves(before["opt_state"]), jax.tree.leaves(after_poison["opt_state"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert np.isfinite(float(clean_metrics["loss"])) and int(clean_metrics["nonfinite_steps"]) == 1
  changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(after_poison["params"]),
                                                       jax.tree.leaves(after_clean["params"]))]
  assert any(changed)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(after_clean["params"]))


def test_stop_policy_applies_and_counts_the_poisoned_step():
  _, (after_poison, metrics), _ = poisoned_steps(False)
  assert int(after_poison["nonfinite_steps"]) == 1 and int(metrics["nonfinite_steps"]) == 1
  assert not all(np.all(np.isfinite(x)) for x in jax.tree.leaves(after_poison["params"]))


def test_a_run_too_large_for_the_device_stops_before_compiling_naming_estimate_and_knobs(tmp_path):
  from tests.helpers import load_config
  from sjmae_jax import plan
  config = load_config("mae", "img=224,model=vit_base")  # digits upsampled to 224 px
  config.batch_size = 1024
  capacity = plan.device_memory_bytes(jax.local_devices()[0])
  assert capacity and capacity >= 2 ** 30  # this host's memory, shared by its CPU devices
  workdir = tmp_path / "run"
  with pytest.raises(ValueError) as raised:
    trainer.train_and_evaluate(config, str(workdir))
  message = str(raised.value)
  assert "\n" not in message
  estimate = float(re.search(r"needs about ([\d.]+) GiB per device", message).group(1))
  assert estimate > capacity / 2 ** 30
  for knob in ("--config.batch_size (1024)", "--config.grad_accum_steps (1)",
               "--config.mesh.fsdp (1)", "--config.model.remat=True"):
    assert knob in message
  assert not workdir.exists()
