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


def test_results_script_end_to_end_at_tiny_size(tmp_path):
  """SJ-MAE: data unpacked from a pack file, pretraining stopped by its time budget, kNN, both
  linear probes, a time-limited fine-tune, and one JSON line with every number."""
  pack_imagefolder.pack(image_folder(tmp_path / "images"), tmp_path / "tiny.pack")
  env = {k: v for k, v in os.environ.items() if k != "SJMAE_CIFAR10_DIR"}
  env.update(TINY="1", PACK=str(tmp_path / "tiny.pack"), DATA_DIR=str(tmp_path / "data"),
             WORK=str(tmp_path / "work"), OUT=str(tmp_path / "out"), PYTHON=sys.executable,
             JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  result = subprocess.run(["bash", str(REPO / "benchmarks" / "cifar10_results.sh"), "sjmae"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  row = json.loads(result.stdout.strip().splitlines()[-1])
  with open(tmp_path / "out" / "cifar10_results.jsonl") as f:
    assert [json.loads(line) for line in f] == [row]
  assert (tmp_path / "data" / "train" / "cat" / "000.jpg").exists()
  assert row["method"] == "sjmae" and row["device"] == "1 x cpu"
  assert row["command"] == "TINY=1 bash benchmarks/cifar10_results.sh sjmae"
  assert row["pretrain_steps"] == 2 < row["pretrain_total_steps"] == 3  # 48 images, batch 16
  assert row["finetune_steps"] == 2 < row["finetune_total_steps"]
  for key in ("knn_top1", "fast_probe_top1", "linear_probe_top1", "finetune_top1"):
    assert 0.0 <= row[key] <= 1.0, key
  assert np.isfinite(row["pretrain_loss"])
  assert set(row["stage_seconds"]) == {"pretrain", "probe", "finetune"}
  for stage in ("pretrain", "probe", "finetune"):
    assert (tmp_path / "out" / f"sjmae-{stage}.log").exists()
