r"""Does a text-aware D^t read the direction words? Its denoising loss with the true captions, with
the directions swapped (left<->right, up<->down) and with no caption, on one batch of synthetic clips,
averaged over the same noise draws.

  python scripts/caption_loss_probe.py WORKDIR_OR_MODEL [--batch 64] [--draws 20]
  python scripts/caption_loss_probe.py WORKDIR_OR_MODEL --times 0.5,0.8,0.9,0.95,0.99

A model that uses the direction scores lower with the true captions than with the swapped ones.
With --times, the mean squared error of the model's clean-clip estimate (x0) at each of those
diffusion times instead of the training loss: the caption should matter most at high noise, where
the clip's motion is not yet visible in its noisy frames. With --times and --clean_first, the
first frame is given clean (time 0, a model trained with diffusion.frame_noise reads a time per
frame) and the error is of the later frames: given where the object starts, the direction word says
where it goes.
"""

import argparse
import functools
import os
import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mav_jax import checkpointing  # noqa: E402
from mav_jax.data import pipeline, tokenizers  # noqa: E402
from mav_jax.diffusion import schedules, targets  # noqa: E402
from mav_jax.stages import common, video  # noqa: E402

OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


class Probe(NamedTuple):
  config: Any
  model: Any
  params: Any
  frozen: Any
  batch: dict  # a training batch, as jax arrays
  swapped: dict  # the same batch with every caption's direction word swapped


def swap_directions(captions: list[str]) -> list[str]:
  """'a red circle moving left' -> 'a red circle moving right' (the direction is the last word)."""
  out = []
  for caption in captions:
    head, _, word = caption.rpartition(" ")
    if word not in OPPOSITE:
      raise ValueError(f"caption {caption!r} does not end in a direction ({sorted(OPPOSITE)})")
    out.append(f"{head} {OPPOSITE[word]}")
  return out


def load(path: str, batch_size: int, needs: str, ok) -> Probe:
  """The decoder at `path` (exits with `needs` in the message unless `ok(config)`), with one batch
  of `batch_size` training clips and its direction-swapped twin."""
  config = checkpointing.load_config(path)
  if config.stage != "decoder" or not ok(config):
    sys.exit(f"error: {path} is not a decoder with {needs}")
  if config.data.tokenizer != "byte":
    sys.exit("error: the caption probes decode byte-tokenized captions only")
  with config.unlocked():
    config.diffusion.cond_dropout = 0.0  # compare conditions, never drop them
  model = video.DECODER.make_model(config)
  params = jax.tree.map(jnp.asarray, checkpointing.restore_params(path, "params"))
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
  frozen = video.DECODER.load_frozen(model, config, mesh)
  data, _ = pipeline.pipeline_from_config(config.data, "train", batch_size=batch_size)
  batch = next(iter(data))
  tokenizer = tokenizers.make_tokenizer(config.data.tokenizer, None)
  captions = [tokenizer.decode(ids) for ids in batch["tokens"]]
  ids, mask = tokenizers.tokenize_batch(
    tokenizer, swap_directions(captions), config.data.max_tokens
  )
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  swapped = dict(batch, tokens=jnp.asarray(ids), token_mask=jnp.asarray(mask))
  return Probe(config, model, params, frozen, batch, swapped)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("path", help="a decoder training workdir or exported model")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--draws", type=int, default=20)
  parser.add_argument("--times", default="", help="comma-separated diffusion times in (0, 1)")
  parser.add_argument(
    "--caption_only",
    action="store_true",
    help="drop the image embedding (zeros): the caption is the only condition",
  )
  parser.add_argument(
    "--clean_first",
    action="store_true",
    help="with --times: the first frame at time 0, the error of the later frames (needs a model "
    "trained with diffusion.frame_noise)",
  )
  args = parser.parse_args()
  probe = load(
    args.path, args.batch, "model.text_motion.enabled=True", lambda c: c.model.text_motion.enabled
  )
  config, model, params, frozen, batch, swapped = probe
  variants = {
    "true captions": batch,
    "directions swapped": swapped,
    "no caption": dict(batch, has_caption=jnp.zeros_like(batch["has_caption"])),
  }
  if args.times:
    x0_error = jax.jit(
      functools.partial(
        _x0_error,
        model,
        config,
        params,
        frozen,
        caption_only=args.caption_only,
        clean_first=args.clean_first,
      ),
    )
    for t in (float(x) for x in args.times.split(",")):
      row = {
        name: np.mean([float(x0_error(b, t, jax.random.key(i))) for i in range(args.draws)])
        for name, b in variants.items()
      }
      print(f"t={t:.2f} x0 error: " + ", ".join(f"{n} {v:.5f}" for n, v in row.items()))
    return
  loss = jax.jit(lambda b, r: video.DECODER.loss_fn(model, config, params, b, r, frozen)[0])
  for name, b in variants.items():
    values = [float(loss(b, jax.random.key(i))) for i in range(args.draws)]
    print(f"{name:<20} loss {np.mean(values):.6f}")


def _x0_error(model, config, params, frozen, batch, t, rng, caption_only=False, clean_first=False):
  """Mean squared error of the model's x0 estimate at diffusion time t (same noise per rng); with
  `clean_first`, the first frame at time 0 and the error of the others."""
  x0 = common.to_model_space(batch["frames"])
  cond = video.DECODER.condition(model, config, x0, batch, frozen, jax.random.key(7))
  if caption_only:
    cond["embedding"] = jnp.zeros_like(cond["embedding"])
  times = jnp.full(x0.shape[:2] if clean_first else x0.shape[:1], t)
  if clean_first:
    times = times.at[:, 0].set(0.0)
  schedule = schedules.schedule_from_config(config.diffusion)
  alpha, sigma = (schedules.broadcast_to(a, x0) for a in schedule.alpha_sigma(times))
  z = alpha * x0 + sigma * jax.random.normal(rng, x0.shape)
  kwargs = video.VideoStage._net_kwargs(cond, image_mode=False)
  pred = model.net.apply({"params": params}, z, times, **kwargs, deterministic=True)
  estimate = targets.convert(
    pred.astype(jnp.float32), z, alpha, sigma, config.diffusion.target, "x0"
  )
  first = 1 if clean_first else 0
  return jnp.mean(jnp.square(estimate[:, first:] - x0[:, first:]))


if __name__ == "__main__":
  main()
