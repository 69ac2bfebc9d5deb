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
      "config", None, "Config file, `path[:arg]` (e.g. configs/sjmae.py:data=cifar10); any of its "
      "keys is set with --config.KEY=VALUE.", lock_config=True)
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
    except KeyboardInterrupt:  # a second Ctrl-C (the first stops after the step, saving)
      fail("interrupted (Ctrl-C): stopped at once, without saving; the same command resumes from "
           "the last complete checkpoint", INTERRUPTED)

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
