"""Import time of a module (default sjmae_jax.trainer) in fresh interpreters: the median of
--runs, and whether TensorFlow is installed and whether the import loaded it.

  python benchmarks/import_time.py                     # sjmae_jax.trainer, 5 runs
  python benchmarks/import_time.py --module sjmae_jax.data --runs 9
"""
import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MEASURE = """
import json, sys, time
start = time.perf_counter()
import {module}
print(json.dumps({{"seconds": time.perf_counter() - start,
                  "tensorflow_loaded": "tensorflow" in sys.modules}}))
"""


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--module", default="sjmae_jax.trainer")
  parser.add_argument("--runs", type=int, default=5)
  args = parser.parse_args()
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
  results = []
  for _ in range(args.runs + 1):  # the first run warms the file cache and .pyc files
    output = subprocess.run([sys.executable, "-c", MEASURE.format(module=args.module)], env=env,
                            cwd=REPO, capture_output=True, text=True, check=True).stdout
    results.append(json.loads(output.strip().splitlines()[-1]))
  seconds = [result["seconds"] for result in results[1:]]
  installed = importlib.util.find_spec("tensorflow") is not None
  print(f"import {args.module}: median {statistics.median(seconds):.2f} s over {args.runs} runs "
        f"(min {min(seconds):.2f}, max {max(seconds):.2f}); TensorFlow "
        f"{'installed' if installed else 'not installed'}, "
        f"{'loaded' if results[-1]['tensorflow_loaded'] else 'not loaded'} by the import")


if __name__ == "__main__":
  main()
