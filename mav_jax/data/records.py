"""The on-disk format of prepared datasets: ArrayRecord shards of msgpack records, plus metadata.

A prepared dataset folder holds `data-XXXXX-of-YYYYY.array_record` shards and `metadata.json`
(kind, counts, skipped files and why). Each record is a msgpack map:
  video: {"kind": "video", "id", "caption", "video": encoded bytes (as found), "fps", "frames",
          "height", "width"}
  image: {"kind": "image", "id", "caption", "image": encoded bytes, "height", "width"}
Videos stay encoded: decoding happens in the input pipeline, where it is parallel and streamed.
"""

import json
import os

import grain
import msgpack
import numpy as np

from mav_jax import errors

METADATA = "metadata.json"
KINDS = ("video", "image")


# Required fields of each kind of record, with their accepted types.
_FIELDS = {
  "video": {
    "id": str,
    "caption": str,
    "video": (bytes, np.ndarray),
    "fps": (int, float),
    "frames": int,
  },
  "image": {"id": str, "caption": str, "image": (bytes, np.ndarray)},
}


class CorruptRecord(ValueError):
  """A record whose bytes are not a valid msgpack map of the expected kind."""


def encode_record(record: dict) -> bytes:
  return msgpack.packb(record, use_bin_type=True)


def decode_record(data: bytes) -> dict:
  try:
    record = msgpack.unpackb(data, raw=False)
  except (msgpack.exceptions.ExtraData, ValueError, TypeError) as e:
    raise CorruptRecord(f"record is not valid msgpack: {e}") from e
  return check_record(record)


def check_record(record) -> dict:
  """`record` if it is a valid record map (decoded, or read from TFDS by `TfdsSource`: there the
  media may also be decoded frames, a uint8 array), else CorruptRecord."""
  if not isinstance(record, dict) or record.get("kind") not in KINDS:
    raise CorruptRecord("record is not a mav_jax video or image record")
  for field, types in _FIELDS[record["kind"]].items():
    if not isinstance(record.get(field), types):
      raise CorruptRecord(
        f"{record['kind']} record {record.get('id', '?')!r} has a missing or invalid {field!r}"
      )
  return record


def shard_paths(folder: str) -> list[str]:
  """The ArrayRecord shards of a prepared dataset folder, sorted."""
  if not os.path.isdir(folder):
    raise errors.UserFileNotFoundError(
      f"no prepared dataset at {folder}: create one with `python -m mav_jax.data.prepare`"
    )
  paths = sorted(
    os.path.join(folder, name) for name in os.listdir(folder) if name.endswith(".array_record")
  )
  if not paths:
    raise errors.UserFileNotFoundError(f"{folder} holds no .array_record shards")
  return paths


def read_metadata(folder: str) -> dict:
  with open(os.path.join(folder, METADATA)) as f:
    return json.load(f)


def array_record_source(folder: str) -> grain.sources.ArrayRecordDataSource:
  """A random-access Grain source of the raw (still msgpack-encoded) records of a folder."""
  return grain.sources.ArrayRecordDataSource(shard_paths(folder))
