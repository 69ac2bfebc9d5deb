"""benchmarks/cifar10_results.sh (the CIFAR-10 results on one accelerator) at tiny size on CPU:
the data packer, the time budgets, training from scratch, and the whole script's JSON line."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from benchmarks import pack_imagefolder
from tests.helpers import REPO, load_config


def image_folder(root, classes=("cat", "dog"), per_class=None):
  """A tiny ImageFolder with train/ and test/ of 32 px JPEGs, one brightness per class."""
  rng = np.random.default_rng(0)
  for split, count in (per_class or {"train": 24, "test": 8}).items():
    for index, name in enumerate(classes):
      folder = root / split / name
      folder.mkdir(parents=True, exist_ok=True)
      for i in range(count):
        pixels = 60 + 120 * index + rng.integers(-40, 40, (32, 32, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i:03d}.jpg")
  return root


def tree_bytes(root):
  return {path.relative_to(root).as_posix(): path.read_bytes()
          for path in sorted(root.rglob("*")) if path.is_file()}


def test_pack_and_unpack_give_back_the_same_files(tmp_path):
  source = image_folder(tmp_path / "images", per_class={"train": 3, "test": 2})
  (source / "train" / ".DS_Store").write_bytes(b"hidden")  # hidden files stay behind
  packed = tmp_path / "packed" / "data.pack"
  assert pack_imagefolder.pack(source, packed)["files"] == 10
  raw_size = sum(len(b) for name, b in tree_bytes(source).items() if ".DS_Store" not in name)
  assert packed.stat().st_size < raw_size + 1024  # the bytes as they are, plus a small index
  pack_imagefolder.unpack(packed, tmp_path / "out")
  expected = {k: v for k, v in tree_bytes(source).items() if ".DS_Store" not in k}
  assert tree_bytes(tmp_path / "out") == expected

  corrupt = bytearray(packed.read_bytes())
  corrupt[-5] ^= 0xFF
  (tmp_path / "corrupt.pack").write_bytes(bytes(corrupt))
  with pytest.raises(ValueError, match="sha256"):
    pack_imagefolder.unpack(tmp_path / "corrupt.pack", tmp_path / "out2")
  (tmp_path / "short.pack").write_bytes(bytes(corrupt[:-5]))
  with pytest.raises(ValueError, match="truncated"):
    pack_imagefolder.unpack(tmp_path / "short.pack", tmp_path / "out3")
  assert pack_imagefolder.main(["unpack", str(tmp_path / "missing.pack"), str(tmp_path)]) == 2


def test_finetune_from_scratch_with_a_time_budget(tmp_path):
  """from_scratch trains config.model from its random init (no init_from); stop_after_minutes
  stops at the first step after the budget (counted from the end of the compiling step 1) and
  evaluates there."""
  from sjmae_jax.evaluation import finetune
  config = load_config("finetune")
  config.unlock()
  config.from_scratch = True
  config.model.update(embed_dim=32, depth=1, num_heads=2)
  config.epochs, config.warmup_epochs, config.optim.layer_decay = 2, 0.5, 1.0
  config.stop_after_minutes = 1e-6
  config.data.recipes.finetune.randaugment = ""
  results = finetune.run(config, str(tmp_path / "scratch"))
  assert results["init_from"] == "scratch"
  assert results["step"] == 2 < results["total_steps"]
  assert results["stopped_after_minutes"] == 1e-6
  assert 0.0 <= results["top1"] <= 1.0 and results["num_eval_examples"] > 0

  config.init_from = str(tmp_path / "scratch")
  with pytest.raises(ValueError, match="from_scratch.*init_from"):
    finetune.run(config, str(tmp_path / "both"))


def run_script(tmp_path, spec, **knobs):
  pack = tmp_path / "tiny.pack"
  if not pack.exists():
    pack_imagefolder.pack(image_folder(tmp_path / "images"), pack)
  env = {k: v for k, v in os.environ.items() if k != "SJMAE_CIFAR10_DIR"}
  env.update(TINY="1", PACK=str(pack), DATA_DIR=str(tmp_path / "data"),
             WORK=str(tmp_path / "work"), OUT=str(tmp_path / "out"), PYTHON=sys.executable,
             JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", **knobs)
  result = subprocess.run(["bash", str(REPO / "benchmarks" / "cifar10_results.sh"), spec],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return [json.loads(line) for line in result.stdout.strip().splitlines()]


@pytest.mark.slow
def test_results_script_runs_every_method_at_tiny_size(tmp_path):
  """One call for every kind of method: data unpacked from a pack file, budget-sized
  pretraining, kNN, the fast probe, budget-sized fine-tunes (SJ-MAE's and scratch's), one JSON
  line per method, the README rows and the plot. (MAE's stages are CAN's with another config
  file, trained in test_train.py; left out here to keep the suite fast.)"""
  readme = tmp_path / "README.md"
  readme.write_text("before\n<!-- cifar10-results -->\nold\n<!-- /cifar10-results -->\nafter\n")
  rows = run_script(tmp_path, "sjmae,can:0.01+0,scratch:0.02", PROBE_MODE="fast",
                    README=str(readme))
  with open(tmp_path / "out" / "cifar10_results.jsonl") as f:
    assert [json.loads(line) for line in f] == rows
  assert [row["method"] for row in rows] == ["sjmae", "can", "scratch"]
  assert (tmp_path / "data" / "train" / "cat" / "000.jpg").exists()
  sjmae, can, scratch = rows
  assert sjmae["device"] == "1 x cpu" and sjmae["data"] == "cifar10 train / test"
  assert sjmae["command"] == ("PROBE_MODE=fast TINY=1 bash benchmarks/cifar10_results.sh "
                              "sjmae,can:0.01+0,scratch:0.02")
  for row in (sjmae, can):  # budget-sized: the schedule completes, its epochs recorded
    assert row["pretrain_minutes"] == 0.01 and row["pretrain_schedule_completed"]
    assert row["pretrain_epochs"] >= 1 and row["pretrain_steps"] == row["pretrain_epochs"] * 3
    assert 0.0 <= row["knn_top1"] <= 1.0 and 0.0 <= row["fast_probe_top1"] <= 1.0
    assert np.isfinite(row["pretrain_loss"])
  assert "finetune_top1" not in can and set(can["stage_seconds"]) == {"pretrain", "probe"}
  for row in (sjmae, scratch):
    assert row["finetune_schedule_completed"] and row["finetune_epochs"] >= 1
    assert 0.0 <= row["finetune_top1"] <= 1.0
  assert sjmae["finetune_minutes"] == 0.01 and scratch["finetune_minutes"] == 0.02
  assert "pretrain_steps" not in scratch and set(scratch["stage_seconds"]) == {"finetune"}
  for stage in ("pretrain", "probe", "finetune"):
    assert (tmp_path / "out" / f"sjmae-{stage}.log").exists()

  table = (tmp_path / "out" / "cifar10_table.md").read_text().splitlines()
  assert table[0].startswith("| method | GPU minutes") and len(table) == 2 + 3
  assert table[2].startswith(f"| sjmae | 0.01 + 0.01 | {sjmae['pretrain_epochs']} / ")
  assert table[4].startswith("| scratch | 0.02 | - / ")
  text = readme.read_text()
  assert "old" not in text and table[2] in text and text.endswith("<!-- /cifar10-results -->\nafter\n")
  from PIL import Image
  with Image.open(tmp_path / "out" / "cifar10.png") as plot:
    assert plot.size == (720, 480)
    pixels = np.asarray(plot.convert("RGB")).reshape(-1, 3)
  colours = {tuple(c) for c in pixels}
  assert (31, 119, 180) in colours and (214, 39, 40) in colours  # sjmae's and scratch's points


def test_holdout_split_keeps_the_test_set_out(tmp_path):
  from benchmarks import cifar10_holdout
  source = image_folder(tmp_path / "images", per_class={"train": 20, "test": 3})
  counts = cifar10_holdout.make_holdout(source, tmp_path / "holdout", every=10)
  assert counts == {"train": 36, "test": 4}
  held = sorted(p.name for p in (tmp_path / "holdout" / "test" / "cat").iterdir())
  assert held == ["009.jpg", "019.jpg"]  # every 10th train image of each class
  for path in (tmp_path / "holdout").rglob("*.jpg"):
    assert path.resolve().parent.parent.name == "train"  # never the real test/
  kept = {p.name for p in (tmp_path / "holdout" / "train" / "cat").iterdir()}
  assert not kept & set(held) and len(kept) == 18
  assert cifar10_holdout.main([str(tmp_path / "missing"), str(tmp_path / "x")]) == 2
