"""What train_step.py prints and records: one Measurement per timed or compiled step, its detail
line, its row of BENCHMARKS.md's Train step table and of the inventory table, and the appending of
rows to BENCHMARKS.md."""
import dataclasses
import math
import statistics

from benchmarks import flops


COLUMNS = ("date", "device", "method", "model", "img", "batch", "img/s", "MFU %", "peer",
           "peer img/s", "ours/peer", "step ms", "MiB/img")
TABLE_HEADER = "| " + " | ".join(COLUMNS) + " |"
TABLE_RULE = "|---|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|"
SECTION_TITLE = "## Train step"
RUNS_TITLE = "Runs"
INVENTORY_COLUMNS = ("method", "model", "img", "batch", "kernels", "fusions", "converts",
                     "cast-only kernels", "scatter MiB", "temp MiB", "saved residuals MiB/img",
                     "dot GFLOP/img")


def device_name(device_kind: str, num_devices: int) -> str:
  return device_kind if num_devices == 1 else f"{num_devices} x {device_kind}"


def footprint_bytes(inventory: dict):
  """The compiled step's buffers: arguments + outputs - aliased (donated) + temporaries."""
  if "temp_bytes" not in inventory:
    return None
  return (inventory["argument_bytes"] + inventory["output_bytes"] - inventory["alias_bytes"]
          + inventory["temp_bytes"])


@dataclasses.dataclass
class Measurement:
  method: str
  model: str
  img: int
  batch: int
  tags: list
  step_seconds: list
  flops_per_image: float
  xla_flops_per_image: float = None
  hlo_dot_flops_per_image: float = None
  attention: str = ""
  compile_seconds: float = 0.0
  loss: float = float("nan")
  peer: dict = None
  inventory: dict = dataclasses.field(default_factory=dict)

  @property
  def timed(self) -> bool:
    return bool(self.step_seconds)

  @property
  def images_per_second(self) -> float:
    return self.batch / statistics.median(self.step_seconds) if self.timed else float("nan")

  def label(self) -> str:
    return self.method + (f" [{', '.join(self.tags)}]" if self.tags else "")

  def mib_per_image(self):
    footprint = footprint_bytes(self.inventory)
    return None if footprint is None else footprint / self.batch / 2 ** 20

  def describe(self, device_kind: str, num_devices: int) -> str:
    """One line: step time, img/s, MFU, FLOPs (analytic, XLA's, HLO dots), attention, compile,
    memory, loss."""
    parts = []
    if self.timed:
      steps_ms = sorted(1e3 * s for s in self.step_seconds)
      mfu = flops.mfu_percent(self.flops_per_image, self.images_per_second, device_kind,
                              num_devices)
      parts += [f"{statistics.median(steps_ms):.2f} ms/step (runs {steps_ms[0]:.2f}-"
                f"{steps_ms[-1]:.2f})", f"{self.images_per_second:,.0f} img/s",
                "MFU n/a" if mfu is None else f"MFU {mfu:.1f} %"]
    parts.append(f"FLOPs/img analytic {self.flops_per_image / 1e9:.4g} G")
    if self.xla_flops_per_image:
      parts.append(f"XLA {self.xla_flops_per_image / 1e9:.4g} G "
                   f"(XLA/analytic {self.xla_flops_per_image / self.flops_per_image:.3f})")
    if self.hlo_dot_flops_per_image:
      parts.append(f"HLO dots {self.hlo_dot_flops_per_image / 1e9:.4g} G "
                   f"(dots/analytic {self.hlo_dot_flops_per_image / self.flops_per_image:.3f})")
    if self.attention:
      parts.append(f"attention {self.attention}")
    if self.compile_seconds:
      parts.append(f"compile {self.compile_seconds:.1f} s")
    if self.mib_per_image() is not None:
      parts.append(f"{self.mib_per_image():.1f} MiB/img")
    if self.timed:
      parts.append(f"loss {self.loss:.4f}" if math.isfinite(self.loss)
                   else f"LOSS NOT FINITE ({self.loss})")
    return f"{self.label()} {self.model} {self.img}px batch {self.batch}: " + ", ".join(parts)

  def row(self, date: str, device_kind: str, num_devices: int) -> str:
    mfu = (flops.mfu_percent(self.flops_per_image, self.images_per_second, device_kind,
                             num_devices) if self.timed else None)
    peer_name = peer_rate = ratio = ""
    if self.peer is not None:
      peer_name = self.peer["peer"]
      if "skipped" in self.peer:
        peer_name += " (skipped)"
      else:
        peer_rate = f"{self.peer['images_per_second']:,.0f}"
        if self.timed:
          ratio = f"{self.images_per_second / self.peer['images_per_second']:.2f}x"
    rate = f"{self.images_per_second:,.0f}" if self.timed else ""
    step_ms = f"{1e3 * statistics.median(self.step_seconds):.1f}" if self.timed else ""
    memory = "" if self.mib_per_image() is None else f"{self.mib_per_image():.1f}"
    cells = [date, device_name(device_kind, num_devices), self.label(), self.model,
             str(self.img), str(self.batch), rate, "" if mfu is None else f"{mfu:.1f}",
             peer_name, peer_rate, ratio, step_ms, memory]
    return "| " + " | ".join(cells) + " |"

  def inventory_row(self) -> str:
    inv = self.inventory
    mib = lambda value: "" if value is None else f"{value / 2 ** 20:,.1f}"
    residuals = inv.get("residual_bytes")
    cells = [self.label(), self.model, str(self.img), str(self.batch)]
    cells += [f"{inv[key]:,}" if key in inv else "" for key in
              ("kernels", "fusions", "converts", "cast_kernels")]
    cells += [mib(inv.get("scatter_bytes")), mib(inv.get("temp_bytes")),
              mib(None if residuals is None else residuals / self.batch),
              "" if not self.hlo_dot_flops_per_image else
              f"{self.hlo_dot_flops_per_image / 1e9:.2f}"]
    return "| " + " | ".join(cells) + " |"


def append_to_benchmarks(path: str, rows: list, run_note: str) -> None:
  """Adds `rows` at the end of the Train step table and `run_note` at the end of its run list."""
  with open(path, encoding="utf-8") as f:
    lines = f.read().split("\n")
  try:
    start = lines.index(SECTION_TITLE)
  except ValueError:
    raise ValueError(f"{path}: no '{SECTION_TITLE}' section") from None
  end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
  header = next((i for i in range(start, end) if lines[i].strip() == TABLE_HEADER), None)
  if header is None:
    raise ValueError(f"{path}: the '{SECTION_TITLE}' section has no table with the header "
                     f"{TABLE_HEADER}")
  table_end = header
  while table_end + 1 < end and lines[table_end + 1].startswith("|"):
    table_end += 1
  lines[table_end + 1:table_end + 1] = rows
  end += len(rows)
  runs = next((i for i in range(table_end, end) if lines[i].startswith(RUNS_TITLE)), None)
  if runs is None:
    raise ValueError(f"{path}: the '{SECTION_TITLE}' section has no '{RUNS_TITLE}' list")
  runs_end = runs
  while runs_end + 1 < end and lines[runs_end + 1].startswith("- "):
    runs_end += 1
  lines.insert(runs_end + 1, run_note)
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines))
