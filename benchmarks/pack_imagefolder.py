"""Pack an ImageFolder tree (e.g. CIFAR-10's train/ and test/ JPEGs) into one file, and back.

  python benchmarks/pack_imagefolder.py pack SRC_DIR packed_data/cifar10.pack
  python benchmarks/pack_imagefolder.py unpack packed_data/cifar10.pack DEST_DIR

For carrying a dataset to a bare accelerator host as one file (packed_data/ is git-ignored):
the file bytes are stored as they are (no re-encoding, no compression: JPEGs do not compress),
so CIFAR-10's 60,000 JPEGs (52.7 MiB) pack into ~53 MiB, where a tar would add a 512-byte header
and padding per file (~45 MiB more). Layout: MAGIC, the length of the index (8 bytes, little
endian), the index (zlib-compressed JSON: {"files": [[relative path, size], ...], "sha256": of
the concatenated contents}), then every file's contents in index order. `unpack` checks the
sha256 and writes SRC_DIR's tree (relative paths, '/'-separated) under DEST_DIR. Standard
library only.
"""
import argparse
import hashlib
import json
import os
import struct
import sys
import zlib
from pathlib import Path

MAGIC = b"SJMAE-PACK-1\n"


def pack(src_dir, out_file) -> dict:
  """Writes every regular file under `src_dir` (sorted, hidden files skipped) to `out_file`."""
  src_dir = Path(src_dir)
  if not src_dir.is_dir():
    raise FileNotFoundError(f"pack: {src_dir} is not a directory")
  paths = sorted(path for path in src_dir.rglob("*")
                 if path.is_file() and not any(part.startswith(".")
                                               for part in path.relative_to(src_dir).parts))
  if not paths:
    raise ValueError(f"pack: no files under {src_dir}")
  digest = hashlib.sha256()
  files = []
  for path in paths:
    data = path.read_bytes()
    digest.update(data)
    files.append([path.relative_to(src_dir).as_posix(), len(data)])
  index = zlib.compress(json.dumps({"files": files, "sha256": digest.hexdigest()}).encode(), 9)
  out_file = Path(out_file)
  out_file.parent.mkdir(parents=True, exist_ok=True)
  partial = out_file.with_name(out_file.name + ".partial")
  with open(partial, "wb") as f:
    f.write(MAGIC + struct.pack("<Q", len(index)) + index)
    for path in paths:
      f.write(path.read_bytes())
  os.replace(partial, out_file)
  return {"files": len(files), "bytes": out_file.stat().st_size}


def unpack(pack_file, dest_dir) -> dict:
  """Writes the packed tree under `dest_dir` (created); checks the contents' sha256."""
  with open(pack_file, "rb") as f:
    if f.read(len(MAGIC)) != MAGIC:
      raise ValueError(f"unpack: {pack_file} is not a pack file (no {MAGIC!r} header)")
    (index_size,) = struct.unpack("<Q", f.read(8))
    index = json.loads(zlib.decompress(f.read(index_size)))
    dest_dir = Path(dest_dir)
    digest = hashlib.sha256()
    made = set()
    for relative, size in index["files"]:
      if Path(relative).is_absolute() or ".." in Path(relative).parts:
        raise ValueError(f"unpack: {pack_file}: unsafe path {relative!r}")
      target = dest_dir / relative
      data = f.read(size)
      if len(data) != size:
        raise ValueError(f"unpack: {pack_file} is truncated at {relative!r}")
      digest.update(data)
      if target.parent not in made:
        target.parent.mkdir(parents=True, exist_ok=True)
        made.add(target.parent)
      target.write_bytes(data)
    if f.read(1):
      raise ValueError(f"unpack: {pack_file} has bytes after its last file")
  if digest.hexdigest() != index["sha256"]:
    raise ValueError(f"unpack: {pack_file}: contents do not match their sha256 (corrupt copy)")
  return {"files": len(index["files"]), "dest": str(dest_dir)}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  pack_parser = sub.add_parser("pack", help="SRC_DIR -> one pack file")
  pack_parser.add_argument("src_dir")
  pack_parser.add_argument("out_file")
  unpack_parser = sub.add_parser("unpack", help="pack file -> DEST_DIR")
  unpack_parser.add_argument("pack_file")
  unpack_parser.add_argument("dest_dir")
  args = parser.parse_args(argv)
  try:
    if args.command == "pack":
      result = pack(args.src_dir, args.out_file)
    else:
      result = unpack(args.pack_file, args.dest_dir)
  except (OSError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
