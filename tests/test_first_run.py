"""The first run as a new user types it: README.md's main command (read from README.md itself) from
a fresh checkout with a relative --workdir, a rerun of the finished run, and the evaluators and the
export with paths relative to a directory that is not the repository root."""
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from tests.helpers import REPO

SHORT_RUN = "--config.stop_at_step=12"  # one epoch of digits and a step: checkpoints 1 and 12
CODE = ("train.py", "eval_linprobe.py", "eval_finetune.py", "configs", "sjmae_jax")


def readme_main_command() -> list:
  """The `python train.py ...` part of the first command in README.md's first bash block."""
  readme = (REPO / "README.md").read_text()
  block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1)
  line = next(line for line in block.splitlines() if "python train.py" in line)
  command = line.split("&&")[-1].strip()
  assert command.startswith("python train.py "), line
  return shlex.split(command)


def run(args, cwd, code=None, timeout=600):
  """`args` in `cwd`, importing sjmae_jax from `code` (default: cwd)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(code or cwd))
  return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def snapshot(directory) -> dict:
  return {str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
          for path in sorted(directory.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
  """The repository's code in a fresh directory: no runs/, nothing prepared beside it."""
  root = tmp_path_factory.mktemp("checkout")
  for name in CODE:
    source = REPO / name
    if source.is_dir():
      shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    else:
      shutil.copy(source, root / name)
  return root


@pytest.fixture(scope="module")
def readme_run(checkout):
  """README's main command, typed in the checkout's root, with a short-run override appended."""
  args = readme_main_command()
  workdir_arg = next(arg for arg in args if arg.startswith("--workdir")).split("=", 1)[-1]
  if workdir_arg == "--workdir":
    workdir_arg = args[args.index("--workdir") + 1]
  assert not os.path.isabs(workdir_arg)  # the README uses a relative workdir, as users do
  result = run([sys.executable, *args[1:], SHORT_RUN], checkout)
  return args, result, checkout / workdir_arg


@pytest.mark.no_tf  # also runs in the virtualenv without TensorFlow (.ci/run)
@pytest.mark.slow
def test_readme_main_command_works_as_typed_and_a_rerun_changes_nothing(readme_run, checkout):
  args, result, workdir = readme_run
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  assert (workdir / "checkpoints" / "12").is_dir() and (workdir / "checkpoints" / "1").is_dir()
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["step"] == 12 and math.isfinite(summary["loss"])
  lines = result.stdout.splitlines()
  assert lines[0].startswith("sjmae pretraining: ViT")  # what runs, first
  assert "from step 0" in lines[1] and "global batch 128" in lines[1]
  assert any(line.strip() == f"TensorBoard:  tensorboard --logdir "
             f"{os.path.relpath(workdir / 'tensorboard', checkout)}" for line in lines[-5:])
  assert len(lines) < 15 and len(result.stderr.splitlines()) < 10  # a quiet console
  assert "parameters.txt" in lines[1] and "decoder" in (workdir / "parameters.txt").read_text()

  before = snapshot(workdir)
  again = run([sys.executable, *args[1:], SHORT_RUN], checkout)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "already complete at step 12" in again.stdout
  assert snapshot(workdir) == before  # summary.json, checkpoints, event files: all unchanged


@pytest.mark.no_tf  # also runs in the virtualenv without TensorFlow (.ci/run)
@pytest.mark.slow
def test_evaluators_and_export_take_paths_relative_to_the_current_directory(readme_run, tmp_path):
  _, result, pretrained = readme_run
  assert result.returncode == 0, result.stderr[-3000:]
  cwd = tmp_path / "elsewhere"  # neither the repository root nor the checkout
  cwd.mkdir()
  init_from = os.path.relpath(pretrained, cwd)
  assert init_from.startswith("..")
  code = pretrained.parent.parent

  probe = run([sys.executable, str(code / "eval_linprobe.py"),
               f"--config={os.path.relpath(code / 'configs/linprobe.py', cwd)}",
               "--workdir=runs/probe", f"--config.init_from={init_from}", "--config.mode=fast",
               "--config.epochs=2"], cwd)
  assert probe.returncode == 0, probe.stderr[-3000:]
  assert probe.stdout.startswith(f"fast linear probe of {pretrained}: features of digits train")
  results = json.loads((cwd / "runs/probe/results.json").read_text())
  assert 0.0 <= results["fast_top1"] <= 1.0
  assert results["config"]["init_from"] == str(pretrained)  # resolved against the cwd

  tune = run([sys.executable, str(code / "eval_finetune.py"),
              "--config=finetune", "--workdir=runs/ft",  # a shipped config, by name
              f"--config.init_from={init_from}", "--config.epochs=1"], cwd)
  assert tune.returncode == 0, tune.stderr[-3000:]
  assert (cwd / "runs/ft/results.json").exists() and (cwd / "runs/ft/checkpoints").is_dir()

  export = run([sys.executable, "-m", "sjmae_jax.export", f"--workdir={init_from}",
                "--out=exports/encoder.safetensors"], cwd, code)
  assert export.returncode == 0, export.stderr[-3000:]
  assert export.stderr == ""  # no library warning (Orbax: "Given directory is read only")
  assert export.stdout.startswith("wrote exports/encoder.safetensors and exports/encoder.json: ")
  assert (cwd / "exports/encoder.safetensors").exists() and (cwd / "exports/encoder.json").exists()

  missing = run([sys.executable, "-m", "sjmae_jax.export", "--workdir=runs/nothing",
                 "--out=exports/x.safetensors"], cwd, code)
  assert missing.returncode == 2 and "Traceback" not in missing.stderr
  assert missing.stderr.strip().splitlines()[-1].startswith("error: ")


@pytest.mark.slow
def test_configs_by_name_from_any_folder_and_unknown_names_list_the_known_ones(tmp_path):
  plan = [sys.executable, "-m", "sjmae_jax.plan", "--devices=1"]
  by_name = run([*plan, "--config", "sjmae:data=cifar10"], tmp_path, REPO)
  assert by_name.returncode == 0, by_name.stderr[-3000:]
  by_path = run([*plan, f"--config={REPO / 'configs/sjmae.py'}:data=cifar10"], tmp_path, REPO)
  assert by_path.returncode == 0 and by_path.stdout == by_name.stdout  # the same config
  assert by_name.stdout.startswith("sjmae ViT-Ti/4 (img 32)"), by_name.stdout  # data=cifar10 applied

  unknown = run([*plan, "--config=sjmea"], tmp_path, REPO)
  assert unknown.returncode == 2 and "Traceback" not in unknown.stderr
  assert unknown.stderr.strip().splitlines() == [
      "error: --config: no config file or shipped config named 'sjmea'; the shipped configs are "
      "can, finetune, linprobe, mae, mapet, simmim, sjmae, ssat (or give a path to a config file)"]
  missing = run([*plan, "--config=configs/sjmae.py"], tmp_path, REPO)  # a clone's path, elsewhere
  assert missing.returncode == 2
  assert missing.stderr.strip().splitlines()[-1].endswith(
      "; the shipped config of that name is --config sjmae")


@pytest.mark.parametrize("program, own_flags", [
    (["train.py"], ("--workdir:",)), (["eval_linprobe.py"], ("--workdir:",)),
    (["eval_finetune.py"], ("--workdir:",)),
    (["-m", "sjmae_jax.plan"], ("--devices:", "--device_memory_gib:"))])
def test_help_lists_the_flags_and_exits_0(program, own_flags):
  script = [str(REPO / program[0])] if program[0].endswith(".py") else program
  result = run([sys.executable, *script, "--help"], REPO)
  assert result.returncode == 0, result.stderr[-2000:]
  for flag in ("--config:", "--verbosity:", "--config.KEY=VALUE", *own_flags):
    assert flag in result.stdout


def test_help_into_a_closed_pipe_has_no_traceback():
  """`python train.py --help | head -3`: the reader stops early; no BrokenPipeError traceback."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  process = subprocess.Popen([sys.executable, str(REPO / "train.py"), "--help"], cwd=REPO,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  process.stdout.close()  # before the help is written: every write fails with EPIPE
  stderr = process.stderr.read()
  assert process.wait(timeout=600) == 0, stderr[-2000:]
  assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr[-2000:]


def test_the_package_builds_with_its_dependencies_and_console_scripts(tmp_path):
  """What `pip install .` installs: every sjmae_jax module, requirements.txt as its dependencies
  (requirements-tf.txt as the `tf` extra), and the console scripts pointing at real functions."""
  import importlib
  import zipfile
  result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "-w", str(tmp_path), str(REPO)], capture_output=True, text=True,
                          timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  (wheel,) = tmp_path.glob("sjmae_jax-*.whl")
  with zipfile.ZipFile(wheel) as archive:
    names = set(archive.namelist())
    metadata = archive.read(next(n for n in names if n.endswith("METADATA"))).decode()
    entry_points = archive.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
  modules = {str(p.relative_to(REPO)) for p in (REPO / "sjmae_jax").rglob("*.py")}
  assert modules <= names, sorted(modules - names)
  assert {f"sjmae_jax/configs/{name}.py" for name in ("sjmae", "mae", "linprobe", "finetune")} <= (
      names)  # the configs ship with the package: --config NAME works after `pip install .`

  def requirements(name):
    lines = (REPO / name).read_text().splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]
  requires = [line[len("Requires-Dist: "):] for line in metadata.splitlines()
              if line.startswith("Requires-Dist: ")]
  plain = [r for r in requires if "extra ==" not in r]
  assert sorted(r.replace(" ", "") for r in plain) == sorted(
      r.replace(" ", "") for r in requirements("requirements.txt"))
  assert all(any(r.startswith(req.split(">")[0].split("=")[0]) for r in requires if "extra ==" in r)
             for req in requirements("requirements-tf.txt"))
  scripts = dict(line.split(" = ") for line in entry_points.splitlines() if " = " in line)
  assert set(scripts) == {"sjmae-train", "sjmae-linprobe", "sjmae-finetune", "sjmae-export",
                          "sjmae-plan"}
  for target in scripts.values():
    module, function = target.split(":")
    assert callable(getattr(importlib.import_module(module), function)), target
