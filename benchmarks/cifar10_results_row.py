"""The JSON line of benchmarks/cifar10_results.sh: every number of the stages' summary.json /
results.json, the device, the minutes and the command.

  python benchmarks/cifar10_results_row.py --method sjmae --work WORK --append FILE.jsonl \
      --command "..." --pretrain-minutes 4 --finetune-minutes 2 [--variant ARGS] [--data TEXT] \
      [STAGE=SECONDS ...]

WORK holds pretrain/ (train.py workdir), probe/ and finetune/ (evaluator workdirs); a stage that
did not run is left out. Prints the line and appends it to FILE.jsonl.
"""
import argparse
import datetime
import json
import os
import subprocess
import sys

TRAIN_IMAGES = 50_000


def load(work: str, path: str) -> dict:
  path = os.path.join(work, path)
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def speed(summary: dict, batch: int, minutes: float):
  """(img/s of the timed steps, epochs of TRAIN_IMAGES that fit in `minutes` at that speed)."""
  if not summary.get("timed_seconds"):
    return None, None
  img_per_s = summary["timed_steps"] * batch / summary["timed_seconds"]
  return round(img_per_s), int(img_per_s * 60 * minutes / TRAIN_IMAGES)


def git_commit() -> str:
  try:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return ""


def results_row(method: str, work: str, command: str, pretrain_minutes: float,
                finetune_minutes: float, stage_seconds: dict, variant: str = "",
                data: str = "cifar10 50k train / 10k test") -> dict:
  import jax
  pretrain, probe, finetune = (load(work, "pretrain/summary.json"),
                               load(work, "probe/results.json"),
                               load(work, "finetune/results.json"))
  pretrain_config = load(work, "pretrain/config.json")
  finetune_config = finetune.get("config", {})
  config = pretrain_config or finetune_config
  if not config:
    raise FileNotFoundError(f"{work}: neither pretrain/config.json nor finetune/results.json")
  model = config["model"]
  row = {"method": method, "variant": variant, "data": data,
         "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
         "model": f"{config['arg']['model']}/{model['patch_size']} {model['img_size']}px",
         "date": datetime.date.today().isoformat(), "commit": git_commit(),
         "jax": jax.__version__, "command": command}
  if pretrain:
    batch = pretrain_config["batch_size"]
    img_per_s, fitting = speed(pretrain, batch, pretrain_minutes)
    decoder = pretrain_config["decoder"]
    row.update(
        decoder=f"{decoder['embed_dim']} wide x {decoder['depth']} deep",
        pretrain_minutes=pretrain_minutes, pretrain_batch=batch,
        pretrain_lr=pretrain_config["lr"] or pretrain_config["blr"] * batch / 256,
        pretrain_epochs=pretrain_config["epochs"], pretrain_steps=pretrain["step"],
        pretrain_total_steps=pretrain["total_steps"],
        pretrain_schedule_completed=pretrain["step"] == pretrain["total_steps"],
        pretrain_img_per_s=img_per_s, pretrain_epochs_fitting=fitting,
        pretrain_loss=pretrain.get("loss"), knn_top1=pretrain.get("knn/top1"),
        fast_probe_top1=probe.get("fast_top1"), linear_probe_top1=probe.get("top1"),
        linear_probe_top5=probe.get("top5"), linear_probe_epochs=probe.get("epochs"))
  if finetune:
    img_per_s, fitting = speed(finetune, finetune_config["batch_size"], finetune_minutes)
    row.update(
        finetune_minutes=finetune_minutes, finetune_from=finetune.get("init_from"),
        finetune_top1=finetune.get("top1"), finetune_best_top1=finetune.get("best_top1"),
        finetune_top5=finetune.get("top5"), finetune_epochs=finetune.get("epochs"),
        finetune_steps=finetune.get("step"), finetune_total_steps=finetune.get("total_steps"),
        finetune_schedule_completed=finetune.get("step") == finetune.get("total_steps"),
        finetune_img_per_s=img_per_s, finetune_epochs_fitting=fitting)
  row.update(stage_seconds=stage_seconds, total_seconds=sum(stage_seconds.values()))
  return row


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--method", required=True)
  parser.add_argument("--work", required=True)
  parser.add_argument("--append", required=True, help="the .jsonl file the line is appended to")
  parser.add_argument("--command", required=True)
  parser.add_argument("--pretrain-minutes", type=float, required=True)
  parser.add_argument("--finetune-minutes", type=float, required=True)
  parser.add_argument("--variant", default="", help="the sweep entry (pretraining args)")
  parser.add_argument("--data", default="cifar10 50k train / 10k test")
  parser.add_argument("stage_seconds", nargs="*", help="STAGE=SECONDS")
  args = parser.parse_args(argv)
  stage_seconds = {name: int(value) for name, value in
                   (item.split("=", 1) for item in args.stage_seconds)}
  row = results_row(args.method, args.work, args.command, args.pretrain_minutes,
                    args.finetune_minutes, stage_seconds, args.variant, args.data)
  line = json.dumps(row)
  print(line)
  with open(args.append, "a") as f:
    f.write(line + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
