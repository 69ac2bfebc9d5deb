"""kNN monitor, linear probe and fine-tuning end to end on digits, from one tiny MAE pretraining
run (the `pretrained_mae` fixture; nothing downloaded), plus the kNN classifier itself and bad input."""

import json
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from sjmae_jax import checkpointing, data, engine, interop, optim, sharding
from sjmae_jax.evaluation import common, fast_probe, finetune, knn, linear_probe
from sjmae_jax.interop.convert import flatten
from tests.helpers import REPO, load_config


def test_knn_on_separable_features_is_perfect():
  rng = np.random.default_rng(0)
  centers = np.eye(4, 16) * 10.0
  train_labels = np.repeat(np.arange(4), 30)
  test_labels = np.repeat(np.arange(4), 10)
  train = centers[train_labels] + rng.normal(size=(120, 16))
  test = centers[test_labels] + rng.normal(size=(40, 16))
  assert knn.knn_top1(train, train_labels, test, test_labels, num_classes=4) == 1.0
  assert knn.knn_top1(train, train_labels, test, test_labels, num_classes=4, chunk=7) == 1.0
  assert knn.knn_top1(train, (train_labels + 1) % 4, test, test_labels, num_classes=4) == 0.0


def test_knn_votes_are_weighted_by_exp_similarity_over_temperature():
  # One very close neighbour of class 1 against two mediocre ones of class 0 (k = 3): the
  # weighted vote (exp(0.99 / 0.07) > 2 exp(0.6 / 0.07)) picks 1, a plain majority would pick 0.
  test = np.array([[1.0, 0.0, 0.0]])
  angle = lambda cos: [cos, np.sqrt(1 - cos ** 2), 0.0]
  train = np.array([angle(0.99), angle(0.6), [0.6, 0.0, 0.8], [-1.0, 0.0, 0.0]])
  labels = np.array([1, 0, 0, 0])
  scores = np.asarray(knn.knn_scores(train, labels, test, num_classes=2, k=3, temperature=0.07))
  np.testing.assert_allclose(scores[0], [2 * np.exp(0.6 / 0.07), np.exp(0.99 / 0.07)], rtol=1e-4)
  assert knn.knn_top1(train, labels, test, np.array([1]), num_classes=2, k=3) == 1.0
  assert knn.knn_top1(train, labels, test, np.array([0]), num_classes=2, k=3, temperature=10) == 1.0


def test_knn_subset_of_a_class_sorted_folder_covers_every_class(tmp_path):
  for split, count in (("train", 10), ("test", 4)):
    for name in ("a", "b", "c"):
      folder = tmp_path / "images" / split / name
      folder.mkdir(parents=True)
      for i in range(count):
        Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(folder / f"{i}.png")
  cfg = data.default_config()
  cfg.source, cfg.data_dir = f"folder:{tmp_path / 'images'}", str(tmp_path / "cache")
  expression = knn.balanced_subset(cfg, "train", 6)
  assert expression == "train[0:2]+train[10:12]+train[20:22]"
  loaded = data.sources.open_source(cfg).load(expression, True)
  assert sorted(loaded.labels.tolist()) == [0, 0, 1, 1, 2, 2]
  assert knn.balanced_subset(cfg, "train", 0) == "train"
  assert knn.balanced_subset(cfg, "test", 100) == "test"
  # Of an expression (the README's short CIFAR run probes train[:10%]): positions map back.
  expression = knn.balanced_subset(cfg, "test+train[5:25]", 9)  # test holds 4 of each class
  assert expression == "test[0:3]+test[4:7]+test[8:11]"
  expression = knn.balanced_subset(cfg, "train[5:25]+test", 9)  # starts with 5 a's, 10 b's
  assert expression == "train[5:8]+train[10:13]+train[20:23]"
  loaded = data.sources.open_source(cfg).load(expression, True)
  assert sorted(loaded.labels.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]


# ---------------------------------------------------------------------------------------------
# One tiny pretraining run (kNN monitor on every epoch), then the evaluators on its workdir.

@pytest.fixture(scope="module")
def pretrained(pretrained_mae):
  return pretrained_mae


def test_knn_monitor_runs_during_pretraining_and_lands_in_summary(pretrained):
  workdir, summary, printed = pretrained
  assert 0.3 < summary["knn/top1"] <= 1.0  # 10 classes: chance is 0.1
  assert json.loads((workdir / "summary.json").read_text())["knn/top1"] == summary["knn/top1"]
  assert len(re.findall(r"^step \d+: knn/top1", printed, re.M)) == 3  # every epoch (3 epochs)
  assert "knn/top1" in printed.splitlines()[-5]  # and in the result line at the end
  # Defaults: on for digits (every 20 epochs), DINO's k and temperature.
  knn_config = load_config("mae").monitors.knn
  assert (knn_config.every_epochs, knn_config.k, knn_config.temperature) == (20, 20, 0.07)


def probe_config(workdir, **overrides):
  config = load_config("linprobe")
  config.unlock()
  config.init_from = str(workdir)
  for key, value in overrides.items():
    setattr(config, key, value)
  return config


@pytest.mark.slow
def test_linear_probe_fast_and_full_on_digits(pretrained, tmp_path):
  config = probe_config(pretrained[0], mode="both", epochs=20)
  results = linear_probe.run(config, str(tmp_path))
  assert results["fast_top1"] > 0.4  # chance 0.1
  assert 0.1 < results["top1"] <= 1.0 and results["top5"] >= results["top1"]
  written = json.loads((tmp_path / "results.json").read_text())
  assert written["split"] == "test" and written["config"]["init_from"] == str(pretrained[0])
  assert {"top1", "top5", "fast_top1", "fast_top5"} <= set(written)
  assert list((tmp_path / "tensorboard").iterdir())


def test_probe_from_an_exported_weights_file(pretrained, tmp_path):
  encoder = checkpointing.load_params(pretrained[0])[0]["encoder"]
  weights = tmp_path / "encoder.safetensors"
  interop.save_state_dict(interop.timm.encoder_to_timm(encoder), weights)
  config = probe_config(weights, mode="fast", epochs=20)
  config.model.update(variant="custom", embed_dim=32, depth=2, num_heads=2)
  model, load = common.encoder_source(config)
  workdir_model, load_from_workdir = common.encoder_source(probe_config(pretrained[0]))
  loaded, from_workdir = load(), load_from_workdir()
  assert (model.embed_dim, model.depth) == (workdir_model.embed_dim, workdir_model.depth) == (32, 2)
  flat_loaded, flat_workdir = flatten(loaded), flatten(from_workdir)
  assert flat_loaded.keys() == flat_workdir.keys()
  for path, value in flat_workdir.items():
    np.testing.assert_allclose(flat_loaded[path], value, rtol=1e-6, err_msg=str(path))
  assert linear_probe.run(config, str(tmp_path / "probe"))["fast_top1"] > 0.4


def test_linear_probe_head_is_bn_without_affine_and_a_small_linear_layer():
  head = fast_probe.ProbeHead(10)
  variables = head.init(jax.random.PRNGKey(0), np.zeros((4, 192), np.float32), train=False)
  assert set(variables["params"]) == {"head"}  # BatchNorm has no scale / bias
  assert set(variables["batch_stats"]["bn"]) == {"mean", "var"}
  kernel = np.asarray(variables["params"]["head"]["kernel"])
  assert abs(kernel.std() - 0.01) < 0.0007 and abs(kernel.mean()) < 0.0007
  assert not np.asarray(variables["params"]["head"]["bias"]).any()
  # torch.nn.BatchNorm1d: the running variance takes the UNBIASED batch variance (momentum 0.1).
  features = np.random.default_rng(0).normal(size=(4, 192)).astype(np.float32)
  _, updated = head.apply(variables, features, train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(updated["batch_stats"]["bn"]["var"],
                             0.9 + 0.1 * features.astype(np.float64).var(0, ddof=1), rtol=1e-5)


def test_finetune_on_digits_keeps_best_and_last_and_resumes(pretrained, tmp_path):
  config = load_config("finetune")
  config.unlock()
  config.init_from = str(pretrained[0])
  config.epochs, config.warmup_epochs, config.ema_decay = 2, 1.0, 0.9
  # RandAugment is covered by the augment_on_device test below; off here to halve the compiles.
  config.data.recipes.finetune.randaugment = ""
  results = finetune.run(config, str(tmp_path))
  assert 0.0 <= results["top1"] <= results["best_top1"] <= 1.0
  assert results["best_epoch"] in (1, 2) and 0.0 <= results["ema_top1"] <= 1.0
  written = json.loads((tmp_path / "results.json").read_text())
  assert written["config"]["optim"]["layer_decay"] == 0.9 and written["top1"] == results["top1"]
  best = json.loads((tmp_path / "best" / "best.json").read_text())
  assert best["value"] == results["best_top1"] and best["step"] // 11 == results["best_epoch"]
  steps = 2 * (1438 // 128)
  assert checkpointing.Checkpointer(tmp_path, read_only=True).latest_step() == steps
  assert checkpointing.Checkpointer(tmp_path / "best", read_only=True).latest_step() in (
      steps // 2, steps)
  # The encoder was trained (not only the head) and started from the pretrained one.
  pretrained_encoder = checkpointing.load_params(pretrained[0])[0]["encoder"]
  last = checkpointing.Checkpointer(tmp_path, read_only=True)
  tuned = last.restore(steps, None)["params"]["encoder"]
  moved = np.abs(np.asarray(tuned["blocks_0"]["mlp"]["fc1"]["kernel"])
                 - pretrained_encoder["blocks_0"]["mlp"]["fc1"]["kernel"])
  assert 0 < moved.max() < 0.1
  # Rerunning a finished run changes nothing and gives its numbers.
  before = (tmp_path / "results.json").read_bytes()
  again = finetune.run(config, str(tmp_path))
  assert again["top1"] == results["top1"] and again["best_top1"] == results["best_top1"]
  assert (tmp_path / "results.json").read_bytes() == before


def test_bad_evaluator_input_fails_with_one_line(pretrained, tmp_path):
  with pytest.raises(ValueError, match="config init_from: empty"):
    linear_probe.run(probe_config(""), str(tmp_path))
  with pytest.raises(FileNotFoundError, match="config init_from: .*nothing.pth does not exist"):
    linear_probe.run(probe_config(tmp_path / "nothing.pth"), str(tmp_path))
  with pytest.raises(ValueError, match="config mode: 'slow'"):
    linear_probe.run(probe_config(pretrained[0], mode="slow"), str(tmp_path))
  config = probe_config(pretrained[0])
  config.data.img_size = 32
  with pytest.raises(ValueError, match="config data.img_size: 32 differs from the encoder's"):
    linear_probe.run(config, str(tmp_path))
  result = subprocess.run(
      [sys.executable, str(REPO / "eval_linprobe.py"), f"--config={REPO / 'configs/linprobe.py'}",
       f"--workdir={tmp_path / 'cli'}", f"--config.init_from={tmp_path / 'missing'}"],
      capture_output=True, text=True, cwd=REPO, timeout=900,
      env={"JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2", "PATH": "/usr/bin:/bin"})
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == (
      f"error: config init_from: {tmp_path / 'missing'} does not exist")


@pytest.mark.parametrize("script,config", [("eval_linprobe.py", "linprobe"),
                                           ("eval_finetune.py", "finetune")])
@pytest.mark.parametrize("flag,expected", [
    ("--config.head_lr=1", "error: --config.head_lr: unknown config key 'head_lr'"),
    ("--config.epochs=many", "--config.epochs=many"),
])
def test_evaluator_cli_rejects_a_bad_config_in_one_line_and_writes_nothing(
    tmp_path, script, config, flag, expected):
  result = subprocess.run(
      [sys.executable, str(REPO / script), f"--config={REPO / 'configs' / config}.py",
       f"--workdir={tmp_path / 'run'}", flag],
      capture_output=True, text=True, cwd=REPO, timeout=900,
      env={"JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2", "PATH": "/usr/bin:/bin"})
  assert result.returncode == 2, result.stderr[-2000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and expected in last, result.stderr[-2000:]
  assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_finetune_step_computes_the_views_itself_with_augment_on_device(tmp_path):
  config = load_config("finetune")
  config.unlock()
  config.model.update(variant="custom", embed_dim=32, depth=2, num_heads=2)
  classifier = common.build_classifier(config, config.model, 10)
  params = classifier.init(jax.random.PRNGKey(0), np.zeros((1, 16, 16, 3), np.float32))["params"]
  tx, schedule = optim.make_optimizer(config, steps_per_epoch=10)
  state = engine.with_bookkeeping({"params": params, "batch_stats": {},
                                   "rng": jax.random.PRNGKey(1)}, tx)
  mesh = sharding.make_mesh(config.mesh)
  new_states = []
  for on_device in (False, True):
    config.data.augment_on_device = on_device
    pipeline = data.build_train_pipeline(config.data, global_batch_size=32, seed=3)
    batch = next(pipeline)
    assert ("raw" in batch) == on_device
    step = jax.jit(engine.make_train_step(
        finetune.make_loss_fn(classifier, config, 10), tx, schedule, mesh,
        finish_batch=pipeline.finish_batch if on_device else None))
    new_states.append(step(state, batch)[0]["params"])
  for host, device in zip(jax.tree.leaves(new_states[0]), jax.tree.leaves(new_states[1])):
    np.testing.assert_allclose(np.asarray(host), np.asarray(device), rtol=1e-4, atol=1e-6)
