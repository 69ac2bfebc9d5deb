"""End-to-end training: learning, resume equality, sharding and multi-host equivalence."""
import json
import socket

import jax
import numpy as np
import pytest

from sjmae_jax import checkpointing, data, optim, sharding, trainer
from tests.helpers import UNINTERRUPTED_RUN, run_train, tiny_config, train_losses


def test_loss_decreases_on_digits_over_50_steps():
  config = tiny_config("mae")
  losses = train_losses(config, 60)
  assert np.all(np.isfinite(losses))
  assert np.mean(losses[-10:]) < 0.85 * np.mean(losses[:10]), losses


@pytest.mark.slow
def test_grad_accumulation_averages_micro_batch_gradients():
  config = tiny_config("sjmae")  # has BatchNorm: checks batch_stats threading as well
  mesh = sharding.make_mesh(config.mesh)
  model = trainer.build_model(config)
  tx, schedule = optim.make_optimizer(config, 10)
  state = trainer.init_state(model, tx, config, jax.random.PRNGKey(0))
  state["step"] = state["step"] + 3  # past step 0, where the warmup lr is 0
  batch = next(iter(data.build_train_pipeline(config.data, global_batch_size=32, seed=0)))
  new_state, metrics = jax.jit(trainer.make_train_step(model, tx, schedule, mesh, 4))(state, batch)

  grad_fn = jax.jit(jax.value_and_grad(trainer.make_loss_fn(model), has_aux=True))
  rng = jax.random.fold_in(state["rng"], state["step"])
  stats, grads, losses = state["batch_stats"], [], []
  for i in range(4):
    rows = np.arange(i, 32, 4)  # strided micro-batch i
    micro = jax.tree.map(lambda x: x[rows], batch)
    (loss, (_, stats)), g = grad_fn(state["params"], stats, micro, jax.random.fold_in(rng, i))
    grads.append(g)
    losses.append(float(loss))
  mean_grads = jax.tree.map(lambda *g: sum(g) / 4, *grads)
  updates, _ = tx.update(mean_grads, state["opt_state"], state["params"])
  expected = jax.tree.map(lambda p, u: p + u, state["params"], updates)
  assert_trees_close(expected, new_state["params"], rtol=1e-4, atol=1e-6)
  assert_trees_close(stats, new_state["batch_stats"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(metrics["loss"]), np.mean(losses), rtol=1e-5)


@pytest.mark.slow
def test_views_computed_inside_the_step_match_views_computed_on_the_host():
  config = tiny_config("sjmae")  # two augmented views (colour jitter, blur, crops)
  mesh = sharding.make_mesh(config.mesh)
  model = trainer.build_model(config)
  tx, schedule = optim.make_optimizer(config, 10)
  state = trainer.init_state(model, tx, config, jax.random.PRNGKey(0))
  state["step"] = state["step"] + 3  # past step 0, where the warmup lr is 0
  host = data.build_train_pipeline(config.data, global_batch_size=32, seed=0)
  config.data.augment_on_device = True
  device = data.build_train_pipeline(config.data, global_batch_size=32, seed=0)
  finished, pre_batch = next(host), next(device)
  assert "images" in finished and "images" not in pre_batch
  assert pre_batch["raw"].dtype == np.uint8
  on_host = jax.jit(trainer.make_train_step(model, tx, schedule, mesh))
  on_device = jax.jit(trainer.make_train_step(model, tx, schedule, mesh,
                                              finish_batch=device.finish_batch))
  (host_state, host_metrics), (device_state, device_metrics) = (
      on_host(dict(state), finished), on_device(dict(state), pre_batch))
  np.testing.assert_allclose(float(device_metrics["loss"]), float(host_metrics["loss"]), rtol=1e-4)
  assert_trees_close(host_state["params"], device_state["params"], rtol=1e-3, atol=1e-5)
  pictures = jax.jit(lambda state, batch: trainer.pictures_fn(model, config.data)(
      state, device.finish_batch(batch)))
  assert all(np.isfinite(np.asarray(v)).all() for v in pictures(device_state, pre_batch).values())


def final_params(workdir):
  params, _ = checkpointing.load_params(workdir)
  return params


def assert_trees_close(a, b, **tol):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path), **tol)


def split_key_bias(params):
  """(params with the key third of every qkv bias zeroed, list of those key biases).

  The key bias has an exactly-zero gradient (softmax is invariant to a per-query shift), so Adam
  turns float noise into lr-sized steps of random sign: runs that sum in a different order (other
  meshes, other process counts) may legitimately differ there by up to ~lr per step.
  """
  keys = []

  def strip(path, x):
    name = jax.tree_util.keystr(path)
    if name.endswith("['qkv']['bias']"):
      d = x.shape[0] // 3
      keys.append(np.asarray(x[d:2 * d]))
      return np.concatenate([x[:d], np.zeros(d, x.dtype), x[2 * d:]])
    return np.asarray(x)
  return jax.tree_util.tree_map_with_path(strip, params), keys


def assert_same_training(a, b, steps, peak_lr):
  (a_rest, a_keys), (b_rest, b_keys) = split_key_bias(a), split_key_bias(b)
  assert_trees_close(a_rest, b_rest, rtol=2e-4, atol=2e-5)
  for x, y in zip(a_keys, b_keys):
    assert np.abs(x - y).max() <= 2 * steps * peak_lr


@pytest.mark.slow
def test_resume_gives_the_same_params_as_an_uninterrupted_run(tmp_path, uninterrupted_run):
  first = run_train(tmp_path / "resumed", overrides={**UNINTERRUPTED_RUN, "stop_at_step": 20})
  assert first.returncode == 0, first.stderr[-3000:]
  assert checkpointing.Checkpointer(tmp_path / "resumed").latest_step() == 20
  # The input pipeline's state is saved with the checkpoint and is what the resumed run starts from.
  data_state = checkpointing.Checkpointer(tmp_path / "resumed", read_only=True).data_state(20)
  assert data_state["step"] == 20 and data_state["grain"] == {"next_index": 20}
  assert (data_state["source"], data_state["num_examples"]) == ("digits", 1438)
  second = run_train(tmp_path / "resumed", overrides=UNINTERRUPTED_RUN)
  assert second.returncode == 0, second.stderr[-3000:]
  assert "from step 20" in second.stdout
  a, b = final_params(uninterrupted_run), final_params(tmp_path / "resumed")
  assert_trees_close(a, b, rtol=0, atol=0)
  summary = json.loads((tmp_path / "resumed" / "summary.json").read_text())
  assert summary["step"] == summary["total_steps"] == 44


@pytest.mark.slow
def test_sharded_8_devices_matches_1_device(tmp_path):
  overrides = {"epochs": 1, "stop_at_step": 6, "warmup_epochs": 0.1,
               "model.embed_dim": 64, "model.num_heads": 4}  # widths divisible by fsdp=2
  single = run_train(tmp_path / "one", overrides=overrides, devices=1)
  assert single.returncode == 0, single.stderr[-3000:]
  multi = run_train(tmp_path / "eight", overrides={**overrides, "mesh.data": 4, "mesh.fsdp": 2,
                                                  "sharding.min_size": 1024}, devices=8)
  assert multi.returncode == 0, multi.stderr[-3000:]
  assert_same_training(final_params(tmp_path / "one"), final_params(tmp_path / "eight"), 6, 2e-4)
  loss = lambda d: json.loads((tmp_path / d / "summary.json").read_text())["loss"]
  np.testing.assert_allclose(loss("one"), loss("eight"), rtol=1e-5)


def free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
  overrides = {"epochs": 1, "stop_at_step": 6, "warmup_epochs": 0.1}
  single = run_train(tmp_path / "single", overrides=overrides, devices=2)
  assert single.returncode == 0, single.stderr[-3000:]
  port = free_port()
  procs = []
  for pid in range(2):
    dist = {"distributed.enabled": True, "distributed.coordinator_address": f"localhost:{port}",
            "distributed.num_processes": 2, "distributed.process_id": pid}
    procs.append(run_train(tmp_path / "multi", overrides={**overrides, **dist}, devices=1,
                           stdout=__import__("subprocess").PIPE, stderr=__import__("subprocess").PIPE,
                           text=True))
  outputs = [p.communicate(timeout=600) for p in procs]
  for p, (out, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  loss = lambda d: json.loads((tmp_path / d / "summary.json").read_text())["loss"]
  np.testing.assert_allclose(loss("single"), loss("multi"), rtol=1e-5)
  assert_same_training(final_params(tmp_path / "single"), final_params(tmp_path / "multi"), 6, 2e-4)


def test_init_from_a_timm_safetensors_file_sets_the_encoder(tmp_path):
  from sjmae_jax import interop
  config = tiny_config("mae")
  mesh = sharding.make_mesh(config.mesh)
  model = trainer.build_model(config)
  tx, _ = optim.make_optimizer(config, 10)
  donor = trainer.init_state(model, tx, config, jax.random.PRNGKey(7))["params"]["encoder"]
  interop.save_state_dict(interop.timm.encoder_to_timm(donor), str(tmp_path / "enc.safetensors"))
  state = trainer.init_state(model, tx, config, jax.random.PRNGKey(0))
  config.init_from = str(tmp_path / "enc.safetensors")
  shardings = sharding.tree_shardings(state, mesh, config.sharding.rules)
  loaded = trainer.initialize_encoder_from(state, config, shardings)
  assert_trees_close(loaded["params"]["encoder"], donor, rtol=0, atol=0)
  assert_trees_close(loaded["params"]["decoder"], state["params"]["decoder"], rtol=0, atol=0)
  config.model.embed_dim = 64
  wider = trainer.init_state(trainer.build_model(config), tx, config, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="init_from.*shape"):
    trainer.initialize_encoder_from(wider, config, sharding.tree_shardings(wider, mesh, config.sharding.rules))


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_params_and_matches_float32_loss():
  losses = {}
  for dtype in ("float32", "bfloat16"):
    config = tiny_config("sjmae", compute_dtype=dtype)
    mesh = sharding.make_mesh(config.mesh)
    model = trainer.build_model(config)
    tx, schedule = optim.make_optimizer(config, 10)
    state = trainer.init_state(model, tx, config, jax.random.PRNGKey(0))
    batch = next(iter(data.build_train_pipeline(config.data, global_batch_size=32, seed=0)))
    new_state, metrics = jax.jit(trainer.make_train_step(model, tx, schedule, mesh))(state, batch)
    dtypes = {leaf.dtype for leaf in jax.tree.leaves(new_state["params"])}
    assert dtypes == {np.dtype("float32")}, dtypes
    assert metrics["loss"].dtype == np.float32
    losses[dtype] = float(metrics["loss"])
  assert np.isfinite(losses["bfloat16"])
  np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=0.05)
