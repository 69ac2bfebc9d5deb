"""The ArrayRecord shards that prepare.py writes and the `arrayrecord:DIR` source reads.

A record: int32 label (little endian), uint16 byte length of the name, the name (UTF-8: the
file's path under ROOT, or 'SPLIT/INDEX' for TFDS), then the encoded image file as it was.
DIR/sjmae_arrayrecord.json, the index, is written last: class names, and per split its shards
(DIR/<split>/<split>-NNNNN.array_record), their record counts and the examples skipped.
"""

import json
import struct

from etils import epath

from sjmae_jax.data.errors import DataError

INDEX_FILE = "sjmae_arrayrecord.json"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<iH")


def encode_record(label, name, image_bytes):
  name_bytes = name.encode()
  return _HEADER.pack(int(label), len(name_bytes)) + name_bytes + bytes(image_bytes)


def decode_record(record):
  """-> (label, name, encoded image bytes) of one record."""
  label, name_length = _HEADER.unpack_from(record)
  start = _HEADER.size
  name = bytes(record[start:start + name_length]).decode()
  return label, name, record[start + name_length:]


def shard_name(split, index):
  return f"{split}-{index:05d}.array_record"


def read_index(directory):
  """The index of a complete prepared directory, or a DataError naming what is missing."""
  path = epath.Path(directory) / INDEX_FILE
  if not path.exists():
    raise DataError(f"{directory} has no {INDEX_FILE}: not prepared, or its preparation did not "
                    "finish (run python -m sjmae_jax.data.prepare ... --out "
                    f"{directory} again; it resumes)")
  index = json.loads(path.read_text())
  if index.get("format") != FORMAT_VERSION:
    raise DataError(f"{path}: format {index.get('format')!r}, this version reads "
                    f"{FORMAT_VERSION}; prepare it again")
  return index
