"""The command-line programs: pretraining, linear probe, fine-tuning (and the plan's flags).

  python train.py --config configs/sjmae.py[:arg] --workdir DIR [--config.key=value ...]
  python eval_linprobe.py --config configs/linprobe.py[:arg] --workdir DIR --config.init_from=PATH
  python eval_finetune.py --config configs/finetune.py[:arg] --workdir DIR --config.init_from=PATH
(installed: sjmae-train, sjmae-linprobe, sjmae-finetune; the export is sjmae-export.)

They share: --config/--workdir flags, relative paths taken from the current directory, a quiet
console (--verbosity=0 brings the libraries' INFO logs back), one `error:` line on stderr for a bad
config, workdir or data (exit status 2, nothing written), and Ctrl-C / SIGTERM stopping after the
current step with a checkpoint (exit 130 / 0; a second Ctrl-C aborts at once).
"""
import os
import re
import sys
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

USAGE_ERROR = 2
NONFINITE_ERROR = 3
INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C
HELP_FLAGS = ("-h", "--help", "-help", "--helpshort", "--helpfull", "-?")

TRAIN_DOC = """Pretrain a ViT with any sjmae_jax objective.

  python train.py --config configs/sjmae.py[:arg] --workdir DIR [--config.key=value ...]

Running the same command again resumes from the workdir's latest checkpoint; on a finished run it
changes nothing (raise --config.epochs to train on). --config.stop_at_step=N stops early, with a
checkpoint, without changing the schedule.

Exit status: 0 done, or stopped by SIGTERM with a checkpoint; 130 stopped by Ctrl-C (with a
checkpoint; rerun to resume); 2 a bad config, workdir or data (one `error:` line, nothing written);
3 stopped at a non-finite loss (config nonfinite='stop'); 1 anything unexpected (its traceback).
"""
LINPROBE_DOC = """Linear-probe a pretrained encoder with the MAE protocol (+ a fast cached-feature probe).

  python eval_linprobe.py --config configs/linprobe.py[:arg] --workdir DIR --config.init_from=PATH

PATH: a pretraining workdir (its latest checkpoint) or a weights file (timm / MAE). Writes
DIR/results.json, TensorBoard logs in DIR/tensorboard and the last state in DIR/checkpoints
(rerunning resumes; Ctrl-C / SIGTERM stop with a checkpoint, as train.py).
"""
FINETUNE_DOC = """Fine-tune a pretrained encoder with the MAE protocol.

  python eval_finetune.py --config configs/finetune.py[:arg] --workdir DIR --config.init_from=PATH

PATH: a pretraining workdir (its latest checkpoint) or a weights file (timm / MAE). Writes
DIR/results.json, TensorBoard logs in DIR/tensorboard, the last state in DIR/checkpoints
(rerunning resumes; Ctrl-C / SIGTERM stop with a checkpoint, as train.py) and the best params in
DIR/best.
"""


def define_flags(workdir_help: str):
  """(--config, --workdir) flag holders; --config is `path[:arg]` plus `--config.key=value`."""
  config = config_flags.DEFINE_config_file(
      "config", None, "Config: a shipped config's name or a config file, with an optional "
      "`:arg` (sjmae, sjmae:data=cifar10, configs/sjmae.py:data=cifar10, my_config.py); any of "
      "its keys is set with --config.KEY=VALUE.", lock_config=True)
  workdir = flags.DEFINE_string("workdir", None, workdir_help)
  flags.mark_flags_as_required(["config", "workdir"])
  return config, workdir


def fail(message: str, status: int = USAGE_ERROR):
  sys.stderr.flush()
  os.write(2, f"error: {message}\n".encode())  # one write: no other thread's output inside it
  # Keep it the last line: after a failed async save, Orbax / TensorStore threads still print
  # tracebacks ("Event loop is closed", ...) while the interpreter shuts down.
  os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
  sys.exit(status)


def last_line(error: BaseException) -> str:
  """The informative line of a config-file error (they carry the config file's traceback)."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  line = lines[-1] if lines else type(error).__name__
  return re.sub(r"^\w+(Error|Exception): ", "", line)


def print_help(doc: str, flag_names) -> None:
  lines = [doc, "Flags:"]
  lines += [f"  --{name}: {flags.FLAGS[name].help}" for name in flag_names]
  lines += ["  --verbosity: 0 shows the libraries' INFO logs (Orbax, TFDS, ...), 1 also debug logs; "
            "by default only warnings of sjmae_jax and errors are shown.",
            "  --config.KEY=VALUE: set any key of the config (nested keys with dots); an unknown key "
            "is an error."]
  try:
    sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.flush()
  except BrokenPipeError:  # `--help | head`: the reader has what it wanted
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def parse_flags(argv, doc: str, flag_names=("config", "workdir")):
  """absl flag parsing with one `error:` line instead of a traceback for a bad --config; --help
  prints `doc` and the program's own flags (`flag_names`), exit 0."""
  if any(arg in HELP_FLAGS for arg in argv[1:]):
    print_help(doc, flag_names)
    sys.exit(0)
  argv = with_config_paths(argv)
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:  # ml_collections: unknown --config.<key>
    message = str(e).replace("\\n", " ")
    quoted = re.search(r"'([^'\\]+)", message)
    key = quoted.group(1) if quoted else message
    suggestion = re.search(r'Did you mean "([^"]+)"', message)
    overrides = [arg.split("=", 1)[0] for arg in argv[1:] if arg.startswith("--config.")]
    named = [flag for flag in overrides if flag.endswith(f".{key}")] or overrides
    fail(f"{', '.join(named)}: unknown config key {key!r}"
         + (f" (did you mean {suggestion.group(1)!r}?)" if suggestion else ""))
  except flags.Error as e:  # wrong type, missing --workdir, ...
    fail(last_line(e))
  except (ValueError, TypeError, OSError) as e:  # get_config raised (e.g. an unknown arg key)
    fail(f"--config: {last_line(e)}")


CONFIGS_DIR = Path(__file__).resolve().parent / "configs"  # shipped with the package


def shipped_configs() -> list:
  return sorted(p.stem for p in CONFIGS_DIR.glob("*.py") if not p.stem.startswith("_"))


def config_path(value: str) -> str:
  """A --config value as a config file `path[:arg]`: a file that exists as it is; a bare name
  (`sjmae`, `sjmae:data=cifar10`) the config of that name shipped with the package."""
  path, colon, arg = value.partition(":")
  named = Path(path).stem
  if os.path.exists(path):
    return value
  if "/" in path or path.endswith(".py"):
    hint = (f"; the shipped config of that name is --config {named}{colon}{arg}"
            if named in shipped_configs() else "")
    fail(f"--config: no such file {path!r} (from {os.getcwd()}){hint}")
  if path not in shipped_configs():
    fail(f"--config: no config file or shipped config named {path!r}; the shipped configs are "
         f"{', '.join(shipped_configs())} (or give a path to a config file)")
  return f"{CONFIGS_DIR / path}.py{colon}{arg}"


def with_config_paths(argv) -> list:
  """argv with a bare config name in `--config NAME` / `--config=NAME` made a path."""
  argv = list(argv)
  for index, arg in enumerate(argv):
    if arg.startswith("--config="):
      argv[index] = "--config=" + config_path(arg.split("=", 1)[1])
    elif arg == "--config" and index + 1 < len(argv):
      argv[index + 1] = config_path(argv[index + 1])
  return argv


def loaded_config(config_flag):
  """The parsed config; a config file that failed to load raises on first access."""
  try:
    config = config_flag.value
    config.get("method")
    return config
  except (OSError, ValueError) as e:
    fail(f"--config: {last_line(e)}")


def run(main, doc: str, flag_names=("config", "workdir")):
  """app.run(main) with our flag parsing, a quiet console and a one-line Ctrl-C abort."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

  def main_with_console(argv):
    if not flags.FLAGS["verbosity"].present:
      from sjmae_jax import console
      console.quiet_logs()
    try:
      return main(argv)
    except KeyboardInterrupt:  # Ctrl-C before the training loop's handler is in place
      from sjmae_jax import engine
      fail(engine.ABORTED_BY_CTRL_C, INTERRUPTED)

  app.run(main_with_console, flags_parser=lambda argv: parse_flags(argv, doc, flag_names))


def _program(doc: str, workdir_help: str, body):
  config_flag, workdir_flag = define_flags(workdir_help)

  def main(argv):
    del argv
    config = loaded_config(config_flag)
    return body(config, workdir_flag.value)
  run(main, doc)


def finish(run_program):
  """Runs `run_program()` (a summary back), mapping its outcomes to exit statuses: one `error:`
  line (2) for a bad config, workdir or data; 3 for a non-finite loss; 130 after Ctrl-C."""
  from sjmae_jax import checkpointing, engine
  try:
    summary = run_program()
  except (ValueError, FileNotFoundError, checkpointing.WorkdirError) as e:  # DataError: a ValueError
    fail(str(e))
  except engine.NonFiniteLossError as e:
    fail(str(e), NONFINITE_ERROR)
  if summary.get("stopped_by") == "SIGINT":
    sys.exit(INTERRUPTED)


def train_main():
  def body(config, workdir):
    from sjmae_jax import trainer
    trainer.initialize_distributed(config.distributed)
    finish(lambda: trainer.train_and_evaluate(config, workdir))
  _program(TRAIN_DOC, "Directory for checkpoints, TensorBoard logs and summary.json.", body)


def linprobe_main():
  def body(config, workdir):
    from sjmae_jax.evaluation import linear_probe
    finish(lambda: linear_probe.run(config, workdir))
  _program(LINPROBE_DOC, "Directory for results.json, checkpoints and TensorBoard logs.", body)


def finetune_main():
  def body(config, workdir):
    from sjmae_jax.evaluation import finetune
    finish(lambda: finetune.run(config, workdir))
  _program(FINETUNE_DOC, "Directory for results.json, checkpoints and TensorBoard logs.", body)



def plan_main():
  """`python -m sjmae_jax.plan` / `sjmae-plan`: the per-device memory of a config on a mesh."""
  from sjmae_jax import plan
  config_flag = config_flags.DEFINE_config_file(
      "config", None, "Config, as train.py's --config (a shipped name or a file, `[:arg]`).",
      lock_config=True)
  devices_flag = flags.DEFINE_integer("devices", 0, "Number of devices to plan for (default: "
                                      "mesh.data x mesh.fsdp when neither is -1).")
  device_memory_flag = flags.DEFINE_float("device_memory_gib", 0.0, "Memory of one device, to "
                                          "say whether the run fits (16 v5e, 32 v4, 80 H100).")
  flags.mark_flags_as_required(["config"])

  def main(argv):
    del argv
    # The plan needs no accelerator, and must not take a TPU that a training run holds.
    import jax
    jax.config.update("jax_platforms", "cpu")
    config = loaded_config(config_flag)
    num_devices = devices_flag.value
    if not num_devices:
      if -1 in (config.mesh.data, config.mesh.fsdp):
        fail("--devices is needed when config.mesh.data or mesh.fsdp is -1")
      num_devices = config.mesh.data * config.mesh.fsdp
    try:
      memory_plan = plan.make_plan(config, num_devices)
    except ValueError as e:
      fail(str(e))
    print(plan.format_plan(memory_plan, device_memory_flag.value))

  run(main, plan.__doc__, ("config", "devices", "device_memory_gib"))
