"""Pretrain a ViT with any sjmae_jax objective.

  python train.py --config configs/mae.py[:arg] --workdir DIR [--config.key=value ...]
Restarting the same command resumes from the workdir's latest checkpoint.

Exit status: 0 done, or stopped by SIGTERM with a checkpoint (rerun to resume); 2 a bad config,
workdir or data (one `error:` line on stderr, nothing written); 3 stopped at a non-finite loss
(config nonfinite='stop'); 1 anything unexpected (with its traceback).
"""
import os
import re
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path[:arg]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and summary.json.")
flags.mark_flags_as_required(["config", "workdir"])

USAGE_ERROR, NONFINITE_ERROR = 2, 3


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


def parse_flags(argv):
  """absl flag parsing with one `error:` line instead of a traceback for a bad --config."""
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


def main(argv):
  del argv
  try:
    config = _CONFIG.value
    distributed = config.distributed  # a config file that failed to load raises on first access
  except (OSError, ValueError) as e:
    fail(f"--config: {last_line(e)}")
  from sjmae_jax import checkpointing, trainer
  trainer.initialize_distributed(distributed)
  try:
    trainer.train_and_evaluate(config, _WORKDIR.value)
  except (ValueError, FileNotFoundError, checkpointing.WorkdirError) as e:  # DataError is a ValueError
    fail(str(e))
  except trainer.NonFiniteLossError as e:
    fail(str(e), NONFINITE_ERROR)


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  app.run(main, flags_parser=parse_flags)
