r"""Prepares real data as ArrayRecord shards for the input pipeline.

  # WebVid layout: a CSV with columns `videoid,name` (and `page_dir`), videos named
  # <videoid>.<ext> in the folder or in its <page_dir>/ subfolders
  python -m mav_jax.data.prepare videos --videos DIR --captions results.csv --output OUT
  # Image-text pairs: a CSV with columns `image,caption` (image: a file name inside --images)
  python -m mav_jax.data.prepare images --images DIR --captions captions.csv --output OUT
  # Either, as a TFDS dataset (ArrayRecord) in the TFDS data dir OUT (mav_jax.data.tfds_datasets)
  python -m mav_jax.data.prepare videos ... --output OUT --format tfds [--split train] [--name N]

Every file is checked (videos: PyAV opens it and decodes a frame; images: PIL verifies it);
unreadable and missing files are skipped, counted and named in the report and in OUT/metadata.json.
An existing OUT is never touched unless --overwrite is given, and even then the new dataset is
written beside it first and swapped in only when complete.
"""

import argparse
import csv
import datetime
import io
import json
import os
import shutil
import sys
import time

from array_record.python.array_record_module import ArrayRecordWriter
from PIL import Image

from mav_jax import errors
from mav_jax.data import records, video

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v")


def _read_captions(
  path: str,
  id_column: str,
  caption_column: str,
  extra: str | None = None,
  encoding: str = "utf-8",
) -> tuple[dict[str, tuple[str, str]], list[dict]]:
  """({id: (caption, extra column or "")}, duplicates) from a CSV with a header.

  A repeated id keeps its first row; each later row is listed in `duplicates` ({id, row, caption}:
  row numbers count the header as row 1). A file that is not valid `encoding` is an error naming
  the row and the byte."""
  if not os.path.isfile(path):
    raise errors.UserFileNotFoundError(f"captions file not found: {path}")
  with open(path, "rb") as f:
    data = f.read()
  try:
    text = data.decode(encoding)
  except LookupError:
    raise errors.UserError(f"--encoding {encoding!r} is not an encoding Python knows") from None
  except UnicodeDecodeError as e:
    row = data[: e.start].count(b"\n") + 1
    raise errors.UserError(
      f"{path}, row {row} (byte {e.start}): not valid {encoding} ({e.reason}: "
      f"{data[e.start : e.end]!r}); pass the file's encoding, e.g. --encoding latin-1 or "
      f"--encoding cp1252"
    ) from None
  reader = csv.DictReader(io.StringIO(text, newline=""))
  missing = {id_column, caption_column} - set(reader.fieldnames or ())
  if missing:
    raise errors.UserError(
      f"{path}: missing column(s) {sorted(missing)}; found {reader.fieldnames}. Expected a "
      f"header with {id_column!r} and {caption_column!r}"
    )
  table, duplicates = {}, []
  for row in reader:
    key = (row[id_column] or "").strip()
    if not key:
      continue
    if key in table:
      duplicates.append({"id": key, "row": reader.line_num, "caption": row[caption_column]})
      continue
    table[key] = (row[caption_column], (row.get(extra) or "").strip() if extra else "")
  return table, duplicates


def _video_record(key: str, caption: str, path: str) -> dict:
  with open(path, "rb") as f:
    data = f.read()
  # Frames counted from the packets (not the header, which in AVI counts time slots), "span" (first
  # to last frame timestamp, s), the real "duration" and average "fps": the pipeline chooses clip
  # frames by their timestamps within the span (see video.probe).
  info = video.probe(data)
  if info["frames"] < 1:
    raise errors.UserError("the video has no frames")
  return {"kind": "video", "id": key, "caption": caption, "video": data, **info}


def _image_record(key: str, caption: str, path: str) -> dict:
  with open(path, "rb") as f:
    data = f.read()
  try:
    with Image.open(io.BytesIO(data)) as img:
      img.verify()
    with Image.open(io.BytesIO(data)) as img:
      width, height = img.size
  except Exception as e:  # PIL raises many types for bad files
    raise errors.UserError(f"cannot decode image: {e}") from e
  return {
    "kind": "image",
    "id": key,
    "caption": caption,
    "image": data,
    "height": height,
    "width": width,
  }


def _find_video(folder: str, key: str, page_dir: str) -> str | None:
  """<folder>/<key>.<ext>, or <folder>/<page_dir>/<key>.<ext> as WebVid's downloader writes."""
  for sub in ([page_dir] if page_dir else []) + [""]:
    for ext in VIDEO_EXTENSIONS:
      path = os.path.join(folder, sub, key + ext)
      if os.path.isfile(path):
        return path
  return None


def captioned_files(
  kind: str, inputs: str, captions: str, encoding: str = "utf-8"
) -> tuple[list[tuple[str, str, str | None]], list[dict], object]:
  """([(id, caption, file path or None when missing)], repeated-id rows, record maker) of a folder
  and its captions CSV: the reading shared by the ArrayRecord and TFDS outputs. The maker turns
  (id, caption, path) into a record dict, raising ValueError / OSError for an unreadable file."""
  if kind == "video":
    table, duplicates = _read_captions(captions, "videoid", "name", "page_dir", encoding)
    entries = [(key, cap, _find_video(inputs, key, page)) for key, (cap, page) in table.items()]
    return entries, duplicates, _video_record
  table, duplicates = _read_captions(captions, "image", "caption", encoding=encoding)
  entries = [
    (key, caption, p if os.path.isfile(p := os.path.join(inputs, key)) else None)
    for key, (caption, _) in table.items()
  ]
  return entries, duplicates, _image_record


def log_duplicates(duplicates: list[dict], log, where: str = records.METADATA) -> None:
  if duplicates:
    log(
      f"[prepare] {len(duplicates)} row(s) repeat an id of an earlier row; the first row of each "
      f"id is kept: "
      + ", ".join(f"{d['id']} (row {d['row']})" for d in duplicates[:10])
      + (f" and {len(duplicates) - 10} more (see {where})" if len(duplicates) > 10 else "")
    )


def prepare(
  kind: str,
  inputs: str,
  captions: str,
  output: str,
  shard_size: int = 1000,
  overwrite: bool = False,
  log=print,
  encoding: str = "utf-8",
) -> dict:
  """Writes the ArrayRecord dataset; returns the metadata it stored (counts and skipped files).

  Raises:
    FileExistsError: `output` exists and `overwrite` is False.
    FileNotFoundError / ValueError: missing inputs, bad CSV, or no readable file at all.
  """
  if kind not in records.KINDS:
    raise errors.UserError(f"unknown kind {kind!r}; choose one of {records.KINDS}")
  if os.path.exists(output) and not overwrite:
    raise errors.UserFileExistsError(
      f"{output} already exists; choose another --output or pass --overwrite"
    )
  if not os.path.isdir(inputs):
    raise errors.UserFileNotFoundError(f"input folder not found: {inputs}")
  if shard_size < 1:
    raise errors.UserError(f"--shard_size must be positive, got {shard_size}")
  entries, duplicates, make = captioned_files(kind, inputs, captions, encoding)
  log_duplicates(duplicates, log)

  staging = f"{output.rstrip(os.sep)}.partial-{os.getpid()}"
  shutil.rmtree(staging, ignore_errors=True)
  os.makedirs(staging)
  num_shards = max(1, -(-len(entries) // shard_size))
  written, skipped, writer, shard = 0, [], None, -1
  start = time.time()
  try:
    for i, (key, caption, path) in enumerate(entries):
      if path is None:
        skipped.append({"id": key, "reason": "file not found"})
      else:
        try:
          record = make(key, caption, path)
        except (ValueError, OSError) as e:
          skipped.append({"id": key, "file": os.path.basename(path), "reason": str(e)})
        else:
          if written // shard_size != shard:
            if writer is not None:
              writer.close()
            shard = written // shard_size
            name = f"data-{shard:05d}-of-{num_shards:05d}.array_record"
            writer = ArrayRecordWriter(os.path.join(staging, name), "group_size:1")
          writer.write(records.encode_record(record))
          written += 1
      if (i + 1) % 100 == 0 or i + 1 == len(entries):
        log(
          f"[prepare] {i + 1}/{len(entries)} checked, {written} written, {len(skipped)} skipped "
          f"({time.time() - start:.0f}s)"
        )
    if writer is not None:
      writer.close()
    if written == 0:
      raise errors.UserError(
        f"no readable {kind} among {len(entries)} captioned entries; first problems: {skipped[:5]}"
      )
    # Shards were named before the count of readable files was known: rename to the real count.
    shards = sorted(n for n in os.listdir(staging) if n.endswith(".array_record"))
    for j, name in enumerate(shards):
      os.rename(
        os.path.join(staging, name),
        os.path.join(staging, f"data-{j:05d}-of-{len(shards):05d}.array_record"),
      )
    metadata = {
      "kind": kind,
      "count": written,
      "skipped_count": len(skipped),
      "skipped": skipped,
      "duplicate_ids": duplicates,
      "inputs": os.path.abspath(inputs),
      "captions": os.path.abspath(captions),
      "created": datetime.datetime.now(datetime.UTC).isoformat(),
    }
    with open(os.path.join(staging, records.METADATA), "w") as f:
      json.dump(metadata, f, indent=2)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  if os.path.exists(output):  # overwrite: swap only now that the new dataset is complete
    backup = f"{output.rstrip(os.sep)}.old-{os.getpid()}"
    os.rename(output, backup)
    try:
      os.rename(staging, output)
    except OSError:
      os.rename(backup, output)  # put the old dataset back; the new one stays in `staging`
      raise
    shutil.rmtree(backup)
  else:
    os.rename(staging, output)
  log(
    f"[prepare] wrote {written} {kind} records in {len(shards)} shard(s) to {output}; "
    f"skipped {len(skipped)}; {len(duplicates)} repeated id(s) left out"
  )
  for item in skipped[:20]:
    log(f"[prepare]   skipped {item['id']}: {item['reason']}")
  if len(skipped) > 20:
    log(f"[prepare]   ... and {len(skipped) - 20} more (see {records.METADATA})")
  return metadata


def _prepare_tfds(kind: str, inputs: str, args, log=print) -> None:
  if args.overwrite:
    raise errors.UserError("--overwrite is for --format array_record; a TFDS version is immutable")
  from mav_jax.data import tfds_datasets  # TensorFlow Datasets: imported only when asked for

  source, meta = tfds_datasets.build(
    kind, inputs, args.captions, args.output, args.split, args.name, args.encoding, log
  )
  log(
    f"[prepare] wrote {meta['count']} {kind} examples to TFDS {source[5:]} in {args.output}; "
    f"skipped {meta['skipped_count']}; {len(meta['duplicate_ids'])} repeated id(s) left out"
  )
  for item in meta["skipped"][:20]:
    log(f"[prepare]   skipped {item['id']}: {item['reason']}")
  if len(meta["skipped"]) > 20:
    log(f"[prepare]   ... and {len(meta['skipped']) - 20} more (see the dataset's metadata.json)")
  log(
    f"[prepare] train on it with --config.data.source={source} --config.data.tfds_data_dir="
    + args.output
  )


class _Parser(argparse.ArgumentParser):
  """argparse with its mistakes (a missing or unknown flag, a bad value) as one `error:` line and
  exit status 1, like the other mav_jax CLIs (argparse's own: the usage, then exit 2)."""

  def error(self, message: str):
    print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
    sys.exit(1)


def main(argv: list[str] | None = None) -> int:
  """Runs the CLI; returns the exit status (0, or 1 after one `error:` line on a user error)."""
  parser = _Parser(
    prog="python -m mav_jax.data.prepare",
    description="Prepare video-text or image-text data as ArrayRecord shards for mav_jax.",
  )
  sub = parser.add_subparsers(dest="kind", required=True)
  videos = sub.add_parser("videos", help="a folder of videos + a WebVid-style CSV (videoid,name)")
  videos.add_argument("--videos", required=True, help="folder of <videoid>.<ext> files")
  images = sub.add_parser("images", help="a folder of images + a CSV with columns image,caption")
  images.add_argument("--images", required=True, help="folder of image files")
  for p in (videos, images):
    p.add_argument("--captions", required=True, help="the captions CSV")
    p.add_argument("--output", required=True, help="folder to create")
    p.add_argument("--shard_size", type=int, default=1000, help="records per shard")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--encoding", default="utf-8", help="the captions CSV's text encoding")
    p.add_argument(
      "--format",
      choices=("array_record", "tfds"),
      default="array_record",
      help="array_record: mav_jax's own shards in --output (data.source=OUTPUT); tfds: a TFDS "
      "dataset (mav_video_text / mav_image_text, ArrayRecord files) in the TFDS data dir --output "
      "(data.source=tfds:NAME[/CONFIG]:SPLIT, data.tfds_data_dir=OUTPUT)",
    )
    p.add_argument("--split", default="train", help="--format tfds: the split the CSV becomes")
    p.add_argument(
      "--name", default="", help="--format tfds: a config name (several datasets in one data dir)"
    )
  args = parser.parse_args(argv)
  kind = "video" if args.kind == "videos" else "image"
  inputs = args.videos if kind == "video" else args.images
  try:
    if args.format == "tfds":
      _prepare_tfds(kind, inputs, args)
    else:
      prepare(
        kind,
        inputs,
        args.captions,
        args.output,
        args.shard_size,
        args.overwrite,
        encoding=args.encoding,
      )
  except errors.UserError as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
