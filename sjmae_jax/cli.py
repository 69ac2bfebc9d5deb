"""What train.py, eval_linprobe.py and eval_finetune.py share: --config/--workdir flags and
one-line `error:` reporting (exit status 2) for a bad config, workdir or data."""
import os
import re
import sys

from absl import app, flags
from ml_collections import config_flags

USAGE_ERROR = 2


def define_flags(workdir_help: str):
  """(--config, --workdir) flag holders; --config is `path[:arg]` plus `--config.key=value`."""
  config = config_flags.DEFINE_config_file("config", None, "Config file (path[:arg]).",
                                           lock_config=True)
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


def loaded_config(config_flag):
  """The parsed config; a config file that failed to load raises on first access."""
  try:
    config = config_flag.value
    config.get("method")
    return config
  except (OSError, ValueError) as e:
    fail(f"--config: {last_line(e)}")


def run(main):
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  app.run(main, flags_parser=parse_flags)
