"""Writing videos (GIF / MP4 with PyAV) and contact sheets (PNG) of generated frames."""

import os

import av
import numpy as np
from PIL import Image

from mav_jax import errors

# (codec, pixel format) per container extension.
_CODECS = {".gif": ("gif", "rgb8"), ".mp4": ("libx264", "yuv420p")}
SUPPORTED = tuple(_CODECS)


def to_uint8(video: np.ndarray) -> np.ndarray:
  """Maps model-space frames in [-1, 1] to uint8 [0, 255] (values outside are clipped)."""
  return np.clip(np.round((np.asarray(video, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def _upscale(frames: np.ndarray, scale: int) -> np.ndarray:
  return frames if scale == 1 else frames.repeat(scale, axis=-3).repeat(scale, axis=-2)


def check_output_path(path: str, overwrite: bool) -> None:
  """Raises before any work is done if `path` has an unsupported type or would be overwritten."""
  ext = os.path.splitext(path)[1].lower()
  if ext not in SUPPORTED:
    raise errors.UserError(f"cannot write {path!r}: supported video types are {SUPPORTED}")
  if os.path.exists(path) and not overwrite:
    raise errors.UserFileExistsError(
      f"{path} already exists; choose another --output or pass --overwrite"
    )


def write_video(path: str, frames: np.ndarray, fps: float = 8.0, scale: int = 1) -> None:
  """Writes uint8 frames [f, h, w, 3] as a GIF or MP4 (by extension), nearest-upscaled by `scale`.

  MP4 (H.264, yuv420p) needs even width and height; odd sizes are rejected with a clear error.
  """
  ext = os.path.splitext(path)[1].lower()
  if ext not in _CODECS:
    raise errors.UserError(f"cannot write {path!r}: supported video types are {SUPPORTED}")
  frames = _upscale(np.asarray(frames, np.uint8), scale)
  if frames.ndim != 4 or frames.shape[-1] != 3:
    raise errors.UserError(f"expected uint8 frames [frames, height, width, 3], got {frames.shape}")
  codec, pix_fmt = _CODECS[ext]
  h, w = frames.shape[1:3]
  if ext == ".mp4" and (h % 2 or w % 2):
    raise errors.UserError(
      f"MP4 needs even frame sizes, got {h}x{w}; write a GIF or use an even scale"
    )
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with av.open(path, "w") as container:
    stream = container.add_stream(codec, rate=max(1, int(round(fps))))
    stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
    for frame in frames:
      container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
    container.mux(stream.encode())


def contact_sheet(
  frames: np.ndarray, path: str, scale: int = 1, columns: int | None = None
) -> None:
  """Saves uint8 frames [f, h, w, 3] side by side (wrapping after `columns`) as one PNG."""
  frames = _upscale(np.asarray(frames, np.uint8), scale)
  f, h, w, c = frames.shape
  columns = columns or f
  rows = -(-f // columns)
  sheet = np.zeros((rows * h, columns * w, c), np.uint8)
  for i, frame in enumerate(frames):
    r, col = divmod(i, columns)
    sheet[r * h : (r + 1) * h, col * w : (col + 1) * w] = frame
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(sheet).save(path)
