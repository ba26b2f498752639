r"""Three checks behind docs/text_motion.md, for a text-aware D^t's training setup:

1. How far apart a frozen CLIP puts captions that differ only in their direction word, against
   captions that differ in colour or shape (mean-pooled token features and the end token's).
2. Whether the captions of a training batch match their clips' motion, read from the pixels by
   the motion benchmark's measure (mav_jax.eval.motion.measure_clip).
3. How much the direction word can save at the highest noise, where a denoiser's best clean-clip
   estimate is the mean clip of its condition: the mean squared error of the per-caption mean clip
   (colour, shape and direction known) against that of the per-(colour, shape) mean, over
   --clips training clips (model space, [-1, 1]).

  python scripts/text_motion_checks.py [--clip checkpoints/tiny/clip] [--variant tiny]
"""

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import decoder  # noqa: E402
from mav_jax.data import pipeline, synthetic, tokenizers  # noqa: E402
from mav_jax.eval import motion  # noqa: E402
from mav_jax.stages import common  # noqa: E402


def feature_distances(clip_path: str, max_tokens: int) -> None:
  clip = common.load_clip(clip_path, "--clip ")
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
  params = clip.load(mesh, "fsdp")
  combos = synthetic.COMBINATIONS
  captions = [synthetic.video_caption(*c) for c in combos]
  ids, mask = tokenizers.tokenize_batch(clip.tokenizer, captions, max_tokens)
  _, features = clip.text(params, jnp.asarray(ids))
  features, mask = np.asarray(features), np.asarray(mask)
  pooled = (features * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
  last = features[np.arange(len(features)), mask.sum(1) - 1]
  index = {c: i for i, c in enumerate(combos)}

  def mean_distance(x, pairs):
    return np.mean([np.linalg.norm(x[index[a]] - x[index[b]]) for a, b in pairs])

  shapes, colours = synthetic.SHAPES, list(synthetic.COLOURS)
  pairs = {
    "direction (left vs right)": [
      ((s, c, "left"), (s, c, "right")) for s in shapes for c in colours
    ],
    "colour (red vs blue)": [
      ((s, "red", d), (s, "blue", d)) for s in shapes for d in synthetic.DIRECTIONS
    ],
    "shape (circle vs square)": [
      (("circle", c, d), ("square", c, d)) for c in colours for d in synthetic.DIRECTIONS
    ],
  }
  norm = np.linalg.norm(features[mask], axis=-1).mean()
  print(f"CLIP {clip_path}: token feature norm {norm:.2f}; captions differing in")
  for name, p in pairs.items():
    print(
      f"  {name}: mean-pooled features {mean_distance(pooled, p):.2f} apart, "
      f"end token {mean_distance(last, p):.2f}"
    )


def batch_matches_motion(variant: str, batch_size: int = 64) -> None:
  config = decoder.get_config(variant)
  data, _ = pipeline.pipeline_from_config(config.data, "train", batch_size=batch_size)
  batch = next(iter(data))
  tokenizer = tokenizers.make_tokenizer(config.data.tokenizer, None)
  if config.data.tokenizer != "byte":
    sys.exit("error: this check decodes byte-tokenized captions only")
  matches = sum(
    motion.measure_clip(clip).direction == tokenizer.decode(ids).split()[-1]
    for ids, clip in zip(batch["tokens"], batch["frames"], strict=True)
  )
  print(
    f"decoder:{variant}: {matches} of {len(batch['frames'])} batch captions name the clip's motion"
  )


def direction_share_at_high_noise(variant: str, clips: int, batch_size: int = 64) -> None:
  config = decoder.get_config(variant)
  data, _ = pipeline.pipeline_from_config(config.data, "train", batch_size=batch_size)
  tokenizer = tokenizers.make_tokenizer(config.data.tokenizer, None)
  frames, captions = [], []
  for batch, _ in zip(data, range(-(-clips // batch_size)), strict=False):
    frames.append(np.asarray(common.to_model_space(batch["frames"])))
    captions += [tokenizer.decode(ids) for ids in batch["tokens"]]
  x = np.concatenate(frames)
  full = np.array(captions)
  without = np.array([c.rsplit(" ", 1)[0] for c in captions])

  def error_of_group_means(keys):
    total = sum(((x[keys == k] - x[keys == k].mean(0)) ** 2).sum() for k in set(keys))
    return total / x.size

  print(
    f"decoder:{variant}, {len(x)} clips: x0 error of the mean clip given nothing "
    f"{((x - x.mean(0)) ** 2).mean():.5f}, given colour + shape {error_of_group_means(without):.5f}, "
    f"given colour + shape + direction {error_of_group_means(full):.5f}"
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--clip", default="checkpoints/tiny/clip")
  parser.add_argument("--variant", default="tiny", help="of configs/decoder.py")
  parser.add_argument("--max_tokens", type=int, default=32)
  parser.add_argument("--clips", type=int, default=3840, help="for check 3")
  args = parser.parse_args()
  feature_distances(args.clip, args.max_tokens)
  batch_matches_motion(args.variant)
  direction_share_at_high_noise(args.variant, args.clips)


if __name__ == "__main__":
  main()
