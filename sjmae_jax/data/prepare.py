"""Converts an image dataset to ArrayRecord shards, once: training then reads them by index.

  python -m sjmae_jax.data.prepare folder:ROOT --out DIR              # ROOT/<split>/<class>/<img>
  python -m sjmae_jax.data.prepare tfds:NAME --out DIR --data-dir D   # a TFDS dataset on disk
  # then: --config.data.source=arrayrecord:DIR

DIR/<split>/<split>-NNNNN.array_record holds the encoded image files as they were (no
re-encoding), in the source's order: a folder's sorted classes and files, a TFDS split's stored
order. So a run reads the same pixels in the same order from the shards as from the source.
DIR/sjmae_arrayrecord.json is the index: class names, and per split the shards, their record
counts and the number of examples. It is written last; a run reads only complete directories.

Each shard is written to a temporary name and renamed when complete, so a killed preparation
resumes where it stopped: complete shards whose record count matches are kept, the rest
rewritten. The counts are checked at the end (records per shard and per split against the
source). Every image is decoded once while writing, so a corrupt one is named here
(--skip-corrupt leaves it out and lists it in the index) and not in the middle of a run.

The record format and the index are in records.py.
"""

import argparse
import concurrent.futures
import functools
import json
import os
import sys

from etils import epath

from sjmae_jax.data.augment_host import decode_image, resolve_decoder
from sjmae_jax.data.errors import DataError
from sjmae_jax.data.records import INDEX_FILE, FORMAT_VERSION, encode_record, shard_name

def _count_records(path):
  from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
  reader = array_record_module.ArrayRecordReader(os.fspath(path))
  try:
    return reader.num_records()
  finally:
    reader.close()


def _write_shard(path, records):
  from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
  temp = path.parent / f"{path.name}.tmp{os.getpid()}"
  # group_size:1: each record is a chunk of its own, so a read by index decodes one record.
  writer = array_record_module.ArrayRecordWriter(os.fspath(temp), "group_size:1")
  try:
    for record in records:
      writer.write(record)
  finally:
    writer.close()
  temp.replace(path)


def _checked(example, decoder):
  """(record, None) or (None, one-line reason) for one (name, read) example."""
  name, read = example
  try:
    label, image_bytes = read()
  except OSError as error:
    return None, f"{name}: {type(error).__name__}: {error}"
  try:
    decode_image(image_bytes, decoder)
  except Exception as error:  # PIL raises many types for bad files  # pylint: disable=broad-except
    text = str(error).splitlines()
    return None, f"{name}: {type(error).__name__}: {text[0] if text else ''}"
  return encode_record(label, name, image_bytes), None


# ---------------------------------------------------------------------------------------------
# Sources: (class_names, {split: [(name, read), ...]}) in the order a run reads them;
# read() -> (label, encoded image bytes).


def _read_file(path, label):
  return label, epath.Path(path).read_bytes()


def _folder_examples(root, cfg):
  from sjmae_jax.data import sources  # pylint: disable=import-outside-toplevel
  source = sources.FolderSource(cfg, root)
  splits = {}
  for split in source.split_names:
    files, labels = source.list_split(split)
    splits[split] = [(os.path.relpath(path, source.root),
                      functools.partial(_read_file, path, int(label)))
                     for path, label in zip(files, labels)]
  return source.class_names, splits


def _read_tfds(records, index):
  example = records.source[index]
  return int(example[records.label_key]), example[records.image_key]


def _tfds_examples(name, cfg):
  from sjmae_jax.data import sources  # pylint: disable=import-outside-toplevel
  source = sources.open_source(cfg)
  if not source.random_access:
    raise DataError(f"{source.description} is stored as {source.file_format.value}; prepare it "
                    f"as ArrayRecord first (tfds build {name} --file_format=array_record)")
  splits = {}
  for split in source.builder.info.splits:
    records = source._records(split)  # pylint: disable=protected-access
    splits[split] = [(f"{split}/{index}", functools.partial(_read_tfds, records, index))
                     for index in range(records.num_examples)]
  return list(source.class_names), splits


# ---------------------------------------------------------------------------------------------


def prepare(source_name, out, *, data_dir=None, examples_per_shard=1024, skip_corrupt=False,
            threads=None, decoder="auto", log=print):
  """Writes (or completes) the shards and the index of `source_name` under `out`."""
  out = epath.Path(out)
  decoder = resolve_decoder(decoder)
  from sjmae_jax.data import config  # pylint: disable=import-outside-toplevel
  cfg = config.default_config()
  cfg.source = source_name
  cfg.data_dir = data_dir or config.default_tfds_dir()
  if source_name.startswith("folder:"):
    class_names, splits = _folder_examples(source_name[len("folder:"):], cfg)
  elif source_name.startswith("tfds:"):
    class_names, splits = _tfds_examples(source_name[len("tfds:"):], cfg)
  else:
    raise DataError(f"cannot prepare {source_name!r} (expected folder:ROOT or tfds:NAME)")
  if examples_per_shard < 1:
    raise DataError(f"--examples-per-shard {examples_per_shard} (expected >= 1)")
  threads = threads or max(2, len(os.sched_getaffinity(0)))
  out.mkdir(parents=True, exist_ok=True)
  index = {"format": FORMAT_VERSION, "source": source_name, "class_names": class_names,
           "splits": {}}
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    for split, examples in splits.items():
      index["splits"][split] = _prepare_split(out, split, examples, examples_per_shard,
                                              skip_corrupt, decoder, pool, log)
  _write_text(out / INDEX_FILE, json.dumps(index, indent=1))
  total = sum(entry["num_examples"] for entry in index["splits"].values())
  log(f"Prepared {source_name}: {total} examples in "
      f"{sum(len(entry['shards']) for entry in index['splits'].values())} shards under {out}")
  return index


def _prepare_split(out, split, examples, examples_per_shard, skip_corrupt, decoder, pool, log):
  split_dir = out / split
  split_dir.mkdir(parents=True, exist_ok=True)
  # The shard layout depends on the corrupt files skipped, so a split's progress is kept in a
  # small file: per finished shard its count and the files it skipped.
  progress_path = split_dir / "progress.json"
  settings = {"num_source_examples": len(examples), "examples_per_shard": examples_per_shard,
              "skip_corrupt": bool(skip_corrupt)}
  progress = json.loads(progress_path.read_text()) if progress_path.exists() else {}
  if progress.get("settings") != settings:
    progress = {"settings": settings, "shards": []}
  kept = []
  for shard in progress["shards"]:  # resume: keep complete shards whose count checks out
    path = split_dir / shard["name"]
    if not path.exists() or _count_records(path) != shard["count"]:
      break
    kept.append(shard)
  progress["shards"] = kept
  if kept:
    log(f"{split}: resuming after {len(kept)} complete shard(s)")
  done = sum(shard["count"] + len(shard["skipped"]) for shard in kept)
  for start in range(done, len(examples), examples_per_shard):
    chunk = examples[start:start + examples_per_shard]
    records, skipped = [], []

    for (name, _), (record, error) in zip(chunk, pool.map(_checked, chunk,
                                                          [decoder] * len(chunk))):
      if error is not None:
        if not skip_corrupt:
          raise DataError(f"cannot decode image {error} (--skip-corrupt leaves such files out)")
        skipped.append(name)
        continue
      records.append(record)
    name = shard_name(split, len(progress["shards"]))
    _write_shard(split_dir / name, records)
    progress["shards"].append({"name": name, "count": len(records), "skipped": skipped})
    _write_text(progress_path, json.dumps(progress))
    log(f"{split}: {min(start + examples_per_shard, len(examples))}/{len(examples)} examples")
  shards = progress["shards"]
  counts = [_count_records(split_dir / shard["name"]) for shard in shards]
  skipped = [name for shard in shards for name in shard["skipped"]]
  if counts != [shard["count"] for shard in shards] or sum(counts) + len(skipped) != len(
      examples):
    raise DataError(f"{split_dir}: record counts {sum(counts)} + {len(skipped)} skipped do not "
                    f"add up to the source's {len(examples)} examples; delete {split_dir} and "
                    "prepare again")
  return {"num_examples": sum(counts), "shards": [shard["name"] for shard in shards],
          "counts": counts, "skipped": skipped}


def _write_text(path, text):
  temp = path.parent / f"{path.name}.tmp{os.getpid()}"
  temp.write_text(text)
  temp.replace(path)


def main(argv=None):
  parser = argparse.ArgumentParser(
      prog="python -m sjmae_jax.data.prepare", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("source", help="folder:ROOT or tfds:NAME")
  parser.add_argument("--out", required=True, help="directory for the shards and the index")
  parser.add_argument("--data-dir", default=None,
                      help="TFDS data_dir (default: $SJMAE_TFDS_DIR or ~/tensorflow_datasets)")
  parser.add_argument("--examples-per-shard", type=int, default=1024)
  parser.add_argument("--skip-corrupt", action="store_true",
                      help="leave undecodable images out (listed in the index) instead of failing")
  parser.add_argument("--threads", type=int, default=None,
                      help="reading / checking threads (default: the host's cores, at least 2)")
  args = parser.parse_args(argv)
  try:
    prepare(args.source, args.out, data_dir=args.data_dir,
            examples_per_shard=args.examples_per_shard, skip_corrupt=args.skip_corrupt,
            threads=args.threads)
  except DataError as error:
    print(f"error: {error}", file=sys.stderr, flush=True)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
