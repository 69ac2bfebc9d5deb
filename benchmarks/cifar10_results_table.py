"""The README table rows and the plot of benchmarks/cifar10_results.sh's JSON lines.

  python benchmarks/cifar10_results_table.py RESULTS.jsonl [--plot results/cifar10.png]
      [--markdown OUT.md] [--readme README.md]

Rows: method, minutes (pretrain + fine-tune), epochs, kNN, linear probe (fast / protocol),
fine-tune top-1, img/s, date, device, command; as measured (a missing number is '-'). The plot
is fine-tune top-1 against GPU minutes, one colour per method, drawn with Pillow (no plotting
library). With --readme the rows replace those between the README's `<!-- cifar10-results -->`
and `<!-- /cifar10-results -->` lines.
"""
import argparse
import json
import sys
from pathlib import Path

HEADER = ("| method | GPU minutes (pretrain + fine-tune) | epochs (pretrain / fine-tune) | kNN | "
          "linear probe (fast / protocol) | fine-tune top-1 | img/s (pretrain / fine-tune) | date "
          "| device | command |\n|---|---|---|---:|---:|---:|---|---|---|---|")
START, END = "<!-- cifar10-results -->", "<!-- /cifar10-results -->"
COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14),
           (140, 86, 75), (227, 119, 194), (127, 127, 127)]


def percent(value) -> str:
  return "-" if value is None else f"{100 * value:.1f}"


def minutes(row) -> float:
  """GPU minutes of training: pretraining + fine-tuning (scratch: its fine-tune minutes)."""
  return float(row.get("pretrain_minutes") or 0) + float(row.get("finetune_minutes") or 0)


def label(row) -> str:
  return row["method"] + (f" [{row['variant']}]" if row.get("variant") else "")


def table_row(row) -> str:
  pre, ft = row.get("pretrain_minutes"), row.get("finetune_minutes")
  spent = " + ".join(f"{m:g}" for m in (pre, ft) if m is not None)
  epochs = " / ".join(str(row.get(k) if row.get(k) is not None else "-")
                      for k in ("pretrain_epochs", "finetune_epochs"))
  speed = " / ".join(str(row.get(k) or "-") for k in ("pretrain_img_per_s", "finetune_img_per_s"))
  probe = f"{percent(row.get('fast_probe_top1'))} / {percent(row.get('linear_probe_top1'))}"
  return (f"| {label(row)} | {spent} | {epochs} | {percent(row.get('knn_top1'))} | {probe} | "
          f"{percent(row.get('finetune_top1'))} | {speed} | {row.get('date', '-')} | "
          f"{row.get('device', '-')} | `{row.get('command', '')}` |")


def markdown(rows) -> str:
  return "\n".join([HEADER] + [table_row(row) for row in rows]) + "\n"


def plot(rows, path, size=(720, 480)) -> None:
  """Fine-tune top-1 (%) against GPU minutes; points of one method joined in minutes order."""
  from PIL import Image, ImageDraw  # pylint: disable=import-outside-toplevel
  points = [(label(row), minutes(row), 100 * row["finetune_top1"]) for row in rows
            if row.get("finetune_top1") is not None]
  width, height = size
  left, right, top, bottom = 60, 180, 30, 50
  image = Image.new("RGB", size, "white")
  draw = ImageDraw.Draw(image)
  x_max = max([m for _, m, _ in points] + [1.0]) * 1.1
  y_low = min([acc for _, _, acc in points] + [100.0])
  y_min, y_max = max(0.0, 10 * (y_low // 10) - 10), 100.0
  to_x = lambda m: left + (width - left - right) * m / x_max
  to_y = lambda acc: height - bottom - (height - top - bottom) * (acc - y_min) / (y_max - y_min)
  draw.rectangle([left, top, width - right, height - bottom], outline="black")
  for tick in range(int(y_min), 101, 10):
    draw.line([left - 4, to_y(tick), left, to_y(tick)], fill="black")
    draw.text((left - 30, to_y(tick) - 6), f"{tick}", fill="black")
  step = max(1, round(x_max / 6))
  for tick in range(0, int(x_max) + 1, step):
    draw.line([to_x(tick), height - bottom, to_x(tick), height - bottom + 4], fill="black")
    draw.text((to_x(tick) - 4, height - bottom + 8), f"{tick}", fill="black")
  draw.text((left, height - 22), "GPU minutes of training (pretrain + fine-tune)", fill="black")
  draw.text((left, 8), "CIFAR-10 test top-1 (%) after fine-tuning", fill="black")
  methods = list(dict.fromkeys(name for name, _, _ in points))
  for index, name in enumerate(methods):
    colour = COLOURS[index % len(COLOURS)]
    mine = sorted((m, acc) for n, m, acc in points if n == name)
    xy = [(to_x(m), to_y(acc)) for m, acc in mine]
    if len(xy) > 1:
      draw.line(xy, fill=colour, width=2)
    for x, y in xy:
      draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour)
    legend_y = top + 16 * index
    draw.rectangle([width - right + 12, legend_y + 2, width - right + 22, legend_y + 12],
                   fill=colour)
    draw.text((width - right + 28, legend_y), name[:24], fill="black")
  Path(path).parent.mkdir(parents=True, exist_ok=True)
  image.save(path)


def replace_block(text: str, block: str) -> str:
  if START not in text or END not in text:
    raise ValueError(f"no {START} ... {END} block")
  head, rest = text.split(START, 1)
  return head + START + "\n" + block + END + rest.split(END, 1)[1]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("jsonl")
  parser.add_argument("--plot", default="")
  parser.add_argument("--markdown", default="")
  parser.add_argument("--readme", default="")
  args = parser.parse_args(argv)
  try:
    with open(args.jsonl) as f:
      rows = [json.loads(line) for line in f if line.strip()]
  except (OSError, json.JSONDecodeError) as e:
    print(f"error: {args.jsonl}: {e}", file=sys.stderr)
    return 2
  text = markdown(rows)
  print(text, end="")
  if args.markdown:
    Path(args.markdown).write_text(text)
  if args.plot:
    plot(rows, args.plot)
  if args.readme:
    readme = Path(args.readme)
    try:
      readme.write_text(replace_block(readme.read_text(), text))
    except (OSError, ValueError) as e:
      print(f"error: {readme}: {e}", file=sys.stderr)
      return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
