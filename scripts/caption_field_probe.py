r"""Inside a text-aware D^t's caption field (model.text_motion_field): on one training batch, the
mean size of each layer's output (and its spread over the batch's captions), how much the field's
output changes when the captions' direction words are swapped, and how much it differs between the
first and last frame. For a D^t with model.text_motion_conv, the same for every motion conv's
kernel mix (how much of its spread over the captions the direction word accounts for) and output.

  python scripts/caption_field_probe.py WORKDIR_OR_MODEL [--batch 8]
"""

import argparse
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import caption_probes  # noqa: E402

from mav_jax.models.caption_field import CaptionField  # noqa: E402
from mav_jax.stages import common, video  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("path", help="a decoder training workdir or exported model")
  parser.add_argument("--batch", type=int, default=8)
  args = parser.parse_args()
  probe = caption_probes.load(
    args.path,
    args.batch,
    "model.text_motion_field or model.text_motion_conv",
    lambda c: c.model.get("text_motion_field", False) or c.model.get("text_motion_conv", 0),
  )
  config, model, params, frozen, batch, swapped = probe
  field_on = config.model.get("text_motion_field", False)
  conv_on = config.model.get("text_motion_conv", 0)
  field = CaptionField(config.model.channels, pool=config.model.get("text_field_pool", "mean"))
  frames, size = config.data.num_frames, config.data.resolution

  def field_of(tokens, token_mask, **kwargs):
    ctx = video.VideoStage.caption_context(
      model, frozen["clip"], tokens, token_mask, batch["has_caption"]
    )
    context = ctx["context"]
    if config.model.get("text_vocab_size", 0):
      context = context + jnp.take(params["temporal_text_tokens"], ctx["context_ids"], axis=0)
      context = context + params["temporal_text_positions"]
    return field.apply(
      {"params": params["temporal_text_field"]},
      context,
      ctx["context_mask"],
      frames,
      size,
      size,
      **kwargs,
    )

  ids, mask = swapped["tokens"], swapped["token_mask"]
  if conv_on:
    _motion_convs(model, config, params, frozen, batch, ids, mask)
  if not field_on:
    return
  out, state = field_of(batch["tokens"], batch["token_mask"], capture_intermediates=True)
  for path, value in jax.tree_util.tree_flatten_with_path(state["intermediates"])[0]:
    name = "/".join(str(getattr(k, "key", k)) for k in path[:-1])
    print(
      f"{name or 'field'}: mean |value| {float(jnp.abs(value).mean()):.4f}, "
      f"spread over the batch {float(value.std(0).mean()):.4f}"
    )
  other = field_of(ids, mask)
  print(
    f"field output: mean |out| {float(jnp.abs(out).mean()):.5f}; true vs swapped directions "
    f"{float(jnp.abs(out - other).mean()):.5f}; first vs last frame "
    f"{float(jnp.abs(out[:, 0] - out[:, -1]).mean()):.5f}"
  )


def _motion_convs(model, config, params, frozen, batch, swapped_ids, swapped_mask):
  """Per motion conv: its kernel mix's size, spread over the batch and change when the direction
  words are swapped, and the same for its output (the UNet run at t = 0.8 on the clean clips)."""
  x0 = common.to_model_space(batch["frames"])
  t = jnp.full(x0.shape[:1], 0.8)

  def run(b):
    cond = video.DECODER.condition(model, config, x0, b, frozen, jax.random.key(7))
    kwargs = video.VideoStage._net_kwargs(cond, image_mode=False)
    _, state = model.net.apply({"params": params}, x0, t, **kwargs, capture_intermediates=True)
    return {
      name: (v["mix"]["__call__"][0], v["out"]["__call__"][0])
      for name, v in state["intermediates"].items()
      if name.startswith("temporal_text_motion_")
    }

  true, other = run(batch), run(dict(batch, tokens=swapped_ids, token_mask=swapped_mask))
  for name in sorted(true):
    (mix, out), (mix_s, out_s) = true[name], other[name]
    print(
      f"{name}: mix |m| {float(jnp.abs(mix).mean()):.3f}, spread over the batch "
      f"{float(mix.std(0).mean()):.3f}, true vs swapped directions "
      f"{float(jnp.abs(mix - mix_s).mean()):.3f}; output |o| {float(jnp.abs(out).mean()):.4f}, "
      f"true vs swapped {float(jnp.abs(out - out_s).mean()):.5f}"
    )


if __name__ == "__main__":
  main()
