r"""Inside a text-aware D^t's caption field (model.text_motion_field): on one training batch, the
mean size of each layer's output (and its spread over the batch's captions), how much the field's
output changes when the captions' direction words are swapped, and how much it differs between the
first and last frame.

  python scripts/caption_field_probe.py WORKDIR_OR_MODEL [--batch 8]
"""

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mav_jax import checkpointing  # noqa: E402
from mav_jax.data import pipeline, tokenizers  # noqa: E402
from mav_jax.models.caption_field import CaptionField  # noqa: E402
from mav_jax.stages import video  # noqa: E402

OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("path", help="a decoder training workdir or exported model")
  parser.add_argument("--batch", type=int, default=8)
  args = parser.parse_args()
  config = checkpointing.load_config(args.path)
  if config.stage != "decoder" or not config.model.get("text_motion_field", False):
    sys.exit(f"error: {args.path} is not a decoder with model.text_motion_field=True")
  if config.data.tokenizer != "byte":
    sys.exit("error: this probe decodes byte-tokenized captions only")
  model = video.DECODER.make_model(config)
  params = jax.tree.map(jnp.asarray, checkpointing.restore_params(args.path, "params"))
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
  frozen = video.DECODER.load_frozen(model, config, mesh)
  data, _ = pipeline.pipeline_from_config(config.data, "train", batch_size=args.batch)
  batch = {k: jnp.asarray(v) for k, v in next(iter(data)).items()}
  tokenizer = tokenizers.make_tokenizer(config.data.tokenizer, None)
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

  out, state = field_of(batch["tokens"], batch["token_mask"], capture_intermediates=True)
  for path, value in jax.tree_util.tree_flatten_with_path(state["intermediates"])[0]:
    name = "/".join(str(getattr(k, "key", k)) for k in path[:-1])
    print(
      f"{name or 'field'}: mean |value| {float(jnp.abs(value).mean()):.4f}, "
      f"spread over the batch {float(value.std(0).mean()):.4f}"
    )
  captions = [tokenizer.decode(ids) for ids in batch["tokens"]]
  swapped = [c.rsplit(" ", 1)[0] + " " + OPPOSITE[c.rsplit(" ", 1)[1]] for c in captions]
  ids, mask = tokenizers.tokenize_batch(tokenizer, swapped, config.data.max_tokens)
  other = field_of(jnp.asarray(ids), jnp.asarray(mask))
  print(
    f"field output: mean |out| {float(jnp.abs(out).mean()):.5f}; true vs swapped directions "
    f"{float(jnp.abs(out - other).mean()):.5f}; first vs last frame "
    f"{float(jnp.abs(out[:, 0] - out[:, -1]).mean()):.5f}"
  )


if __name__ == "__main__":
  main()
