"""The PyTorch peers of train_step.py: benchmarks/torch_peer.py run in a subprocess for a case's
config, its result line and its table row."""
import json
import os
import subprocess
import sys

from benchmarks import flops
from benchmarks.step_table import device_name
from sjmae_jax.models.vit import vit_kwargs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEER_SCRIPT = os.path.join(REPO, "benchmarks", "torch_peer.py")


def peer_method(peer: str) -> str:
  """The method a peer implements: sjmae:DIR is SJ-MAE, timm and mae:DIR are MAE."""
  return "sjmae" if peer.startswith("sjmae:") else "mae"


def run_peer(peer: str, config, args) -> dict:
  """benchmarks/torch_peer.py in a subprocess for this config; its JSON result."""
  encoder = vit_kwargs(config.model)
  method = peer_method(peer)
  block = config.sjmae if method == "sjmae" else config.mae
  command = [sys.executable, PEER_SCRIPT, "--peer", peer,
             "--img", str(encoder["img_size"]), "--patch", str(encoder["patch_size"]),
             "--embed-dim", str(encoder["embed_dim"]), "--depth", str(encoder["depth"]),
             "--heads", str(encoder["num_heads"]), "--mlp-ratio", str(encoder["mlp_ratio"]),
             "--decoder-dim", str(config.decoder.embed_dim),
             "--decoder-depth", str(config.decoder.depth),
             "--decoder-heads", str(config.decoder.num_heads),
             "--mask-ratio", str(block.mask_ratio), "--batch", str(config.batch_size),
             "--dtype", config.compute_dtype, "--steps", str(args.steps),
             "--repeats", str(args.repeats), "--warmup", str(max(args.warmup, 3))]
  if method == "sjmae":
    command += ["--mask-ratio-jigsaw", str(block.mask_ratio_jigsaw),
                "--predictor-dim", str(block.predictor_hidden_dim)]
  try:
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800, check=False)
  except subprocess.TimeoutExpired:
    return {"peer": peer.split(":")[0], "skipped": "timed out after 1800 s"}
  lines = result.stdout.strip().splitlines()
  if result.returncode != 0 or not lines:
    tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"peer": peer.split(":")[0], "skipped": f"exit {result.returncode}: {tail[0]}"}
  return json.loads(lines[-1])


def describe_peer(result: dict) -> str:
  if "skipped" in result:
    return f"peer {result['peer']}: skipped ({result['skipped']})"
  how = ", ".join(filter(None, ["AMP bf16" if result["amp_bf16"] else "float32",
                                "torch.compile" if result["compiled"] else "eager"]))
  return (f"peer {result['peer']} (torch {result['torch']}, timm {result['timm']}; {how}) on "
          f"{result['device']}: {result['images_per_second']:,.0f} img/s, step "
          f"{result['step_ms']:.2f} ms, {result['params']:,} params, loss {result['loss']:.4f}")


def peer_row(result: dict, method: str, model: str, config, date: str, device_kind: str,
             num_devices: int) -> str:
  """The table row of a peer: its img/s, and MFU by our analytic FLOPs of the same step."""
  label = f"peer {result['peer']} ({method})"
  rate = mfu = step_ms = ""
  if "skipped" in result:
    label += " (skipped)"
  else:
    rate = f"{result['images_per_second']:,.0f}"
    value = flops.mfu_percent(flops.train_flops_per_image(config, config.batch_size),
                              result["images_per_second"], device_kind, num_devices)
    mfu = "" if value is None else f"{value:.1f}"
    step_ms = f"{result['step_ms']:.1f}"
  cells = [date, device_name(device_kind, num_devices), label, model,
           str(config.model.img_size), str(config.batch_size), rate, mfu, "", "", "", step_ms, ""]
  return "| " + " | ".join(cells) + " |"
