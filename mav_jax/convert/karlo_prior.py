"""Karlo's prior: diffusers' `PriorTransformer` state dict -> `DiffusionPrior` parameters.

The prior of Kakao Brain's Karlo (unCLIP) in the diffusers layout (subfolder `prior`: config.json
and diffusion_pytorch_model.*) is a `DiffusionPrior` with `causal=True` (diffusers adds a causal
mask whenever an attention mask is passed, and the pipeline always passes one),
`activation="gelu_exact"` (the feed-forward's torch `GELU()` is erf GELU), `time_scale=1` (integer
timesteps) and `clip_stats=True` (`clip_mean`, `clip_std`: the network sees and predicts normalised
CLIP image embeddings).

| diffusers | DiffusionPrior |
|---|---|
| time_embedding.linear_1 / linear_2 | time_mlp/fc1, fc2 |
| proj_in | noisy_proj |
| embedding_proj | text_proj |
| encoder_hidden_states_proj | token_proj |
| positional_embedding (1, n + 4, w) | positional_embedding (n + 4, w), max_tokens = n |
| prd_embedding (1, 1, w) | query (w,) |
| transformer_blocks.i.norm1, norm3 | block_i/ln_1, ln_2 |
| transformer_blocks.i.attn1.to_q/k/v, to_out.0 | block_i/attn/query, key, value, out |
| transformer_blocks.i.ff.net.0.proj, ff.net.2 | block_i/fc1, fc2 |
| norm_out, proj_to_clip_embeddings | ln_final, out_proj |
| clip_mean, clip_std (1, d) | clip_mean, clip_std (d,) |

The non-persistent `causal_attention_mask` buffer carries no weights (the model builds its own
mask); it is skipped if a state dict has it.
"""

from collections.abc import Mapping
from typing import Any

from mav_jax import errors
from mav_jax.convert.common import StateReader

# PriorTransformer.__init__'s defaults in diffusers 0.42.1: a config.json written by an older
# diffusers lacks the keys added since (time_embed_act_fn, norm_in_type, ...), and diffusers fills
# them in from these.
DEFAULTS: dict[str, Any] = {
  "num_attention_heads": 32,
  "attention_head_dim": 64,
  "num_layers": 20,
  "embedding_dim": 768,
  "num_embeddings": 77,
  "additional_embeddings": 4,
  "dropout": 0.0,
  "time_embed_act_fn": "silu",
  "norm_in_type": None,
  "embedding_proj_norm_type": None,
  "encoder_hid_proj_type": "linear",
  "added_emb_type": "prd",
  "time_embed_dim": None,
  "embedding_proj_dim": None,
  "clip_embed_dim": None,
}

# The values of Karlo's architecture, the only ones DiffusionPrior can be.
_REQUIRED: dict[str, Any] = {
  "additional_embeddings": 4,
  "time_embed_act_fn": "silu",
  "norm_in_type": None,
  "embedding_proj_norm_type": None,
  "encoder_hid_proj_type": "linear",
  "added_emb_type": "prd",
}
_SIZES = (
  "num_attention_heads",
  "attention_head_dim",
  "num_layers",
  "embedding_dim",
  "num_embeddings",
)

WHAT = "the prior (a diffusers PriorTransformer)"


def _unsupported(key: str, value: Any, supported: str) -> errors.UserError:
  return errors.UserError(
    f"{WHAT}: config.json has {key}={value!r}, which mav_jax's DiffusionPrior cannot express "
    f"(supported: {supported})"
  )


def read_config(hf_config: Mapping[str, Any]) -> dict[str, Any]:
  """A PriorTransformer config.json (dict) -> the DiffusionPrior constructor kwargs, with
  diffusers 0.42.1's defaults for missing keys; a UserError names any key whose value Karlo's
  architecture does not have."""
  name = hf_config.get("_class_name", "PriorTransformer")
  if name != "PriorTransformer":
    raise errors.UserError(f"{WHAT}: config.json has _class_name={name!r}, not 'PriorTransformer'")
  c = {**DEFAULTS, **{k: v for k, v in hf_config.items() if k in DEFAULTS}}
  for key in _SIZES:
    value = c[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise _unsupported(key, value, "a positive integer")
  for key, want in _REQUIRED.items():
    if c[key] != want:
      raise _unsupported(key, c[key], repr(want))
  if c["dropout"] != 0:
    raise _unsupported("dropout", c["dropout"], "0.0")
  width = c["num_attention_heads"] * c["attention_head_dim"]
  # diffusers reads each of these as `value or default`: None (or 0) means the default.
  for key, default in (
    ("time_embed_dim", width),
    ("embedding_proj_dim", c["embedding_dim"]),
    ("clip_embed_dim", c["embedding_dim"]),
  ):
    if c[key] and c[key] != default:
      raise _unsupported(key, c[key], f"None or {default}")
  return {
    "embed_dim": c["embedding_dim"],
    "width": width,
    "layers": c["num_layers"],
    "heads": c["num_attention_heads"],
    "max_tokens": c["num_embeddings"],
    "activation": "gelu_exact",
    "causal": True,
    "time_scale": 1.0,
    "clip_stats": True,
  }


def convert_prior(
  state: Mapping[str, Any], hf_config: Mapping[str, Any], what: str = WHAT
) -> tuple[dict[str, Any], dict[str, Any]]:
  """A PriorTransformer's state dict (name -> torch tensor or array) and config.json (dict) ->
  (DiffusionPrior constructor kwargs, its params: nested dicts of float32 numpy arrays (possibly
  transposed views), the module's unboxed parameter tree). Every tensor is used once; a missing, misshapen or left-over
  tensor, or an unsupported config value, is a UserError naming it."""
  kwargs = read_config(hf_config)
  d, w, heads = kwargs["embed_dim"], kwargs["width"], kwargs["heads"]
  head_dim, positions = w // heads, kwargs["max_tokens"] + 4
  r = StateReader(state, what, ignore=("causal_attention_mask",))

  def block(i: int) -> dict[str, Any]:
    p = f"transformer_blocks.{i}"
    attn = {
      ours: r.heads_in(f"{p}.attn1.{theirs}", w, heads, head_dim)
      for ours, theirs in (("query", "to_q"), ("key", "to_k"), ("value", "to_v"))
    }
    attn["out"] = r.heads_out(f"{p}.attn1.to_out.0", w, heads, head_dim)
    return {
      "ln_1": r.norm(f"{p}.norm1", w),
      "attn": attn,
      "ln_2": r.norm(f"{p}.norm3", w),
      "fc1": r.linear(f"{p}.ff.net.0.proj", w, 4 * w),
      "fc2": r.linear(f"{p}.ff.net.2", 4 * w, w),
    }

  params: dict[str, Any] = {
    "token_proj": r.linear("encoder_hidden_states_proj", d, w),
    "text_proj": r.linear("embedding_proj", d, w),
    "time_mlp": {
      "fc1": r.linear("time_embedding.linear_1", w, w),
      "fc2": r.linear("time_embedding.linear_2", w, w),
    },
    "noisy_proj": r.linear("proj_in", d, w),
    "query": r.take("prd_embedding", (1, 1, w)).reshape(w),
    "positional_embedding": r.take("positional_embedding", (1, positions, w)).reshape(positions, w),
  }
  for i in range(kwargs["layers"]):
    params[f"block_{i}"] = block(i)
  params["ln_final"] = r.norm("norm_out", w)
  params["out_proj"] = r.linear("proj_to_clip_embeddings", w, d)
  params["clip_mean"] = r.take("clip_mean", (1, d)).reshape(d)
  params["clip_std"] = r.take("clip_std", (1, d)).reshape(d)
  r.finish()
  return kwargs, params
