r"""Layer implementations side by side on one TPU chip (issue 24): the TPU compiler's estimate for
forward + backward of one block at the paper D^t's and SR_l^t's shapes, per variant.

  .venv/bin/python scripts/op_variants.py temporal_conv   # ResBlock: 3D conv, matmul per tap, 1D conv
  .venv/bin/python scripts/op_variants.py attention       # jax.nn.dot_product_attention vs attend
  .venv/bin/python scripts/op_variants.py group_norm      # flax GroupNorm vs per-channel sums

Needs the libtpu wheel (requirements-tpu.txt); compiles ahead of time for one chip of `--target`
(nothing runs). Prints, per shape and variant: the estimated time (`optimal_seconds`), FLOPs,
bytes and the per-kind shares of `compiled_stats.per_op`. Compiler estimates, not measurements.
The 3D-conv and matmul-per-tap temporal convs and jax.nn's attention are kept here only as the
references the shipped layers (`models/conv.TemporalConv`, `models/attention.attend`) were
measured against; the
per-channel-sums GroupNorm is the variant that did not pay (the shipped FrameGroupNorm is flax's).
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import topologies  # noqa: E402

from mav_jax.models import attention, conv, resblock  # noqa: E402
from mav_jax.parallel import compiled_stats  # noqa: E402

# (batch, frames, height, width, channels) per chip: 2 clips, the UNet levels of decoder:paper
# (320 x (1, 2, 3, 4) channels at 64..8 pixels) and SR_l^t's top level (128 channels at 256).
RESBLOCK_SHAPES = (
  (2, 16, 64, 64, 320),
  (2, 16, 32, 32, 640),
  (2, 16, 16, 16, 960),
  (2, 16, 8, 8, 1280),
  (2, 8, 256, 256, 128),
)
# (sequences, tokens, heads, head_dim): D^t's spatial attention at 32x32 and 16x16 (2 clips x 16
# frames), the 32x32 level with heads of 128, and the temporal attention (16 frames per position).
ATTENTION_SHAPES = (
  (32, 1024, 10, 64),
  (32, 256, 15, 64),
  (32, 1024, 5, 128),
  (2048, 16, 10, 64),
  (512, 16, 15, 64),
)


class Conv3dTemporal(conv.TemporalConv):
  """The temporal conv as it was before issue 24: a (taps, 1, 1) 3D conv, same parameters."""

  def convolve(self, x, kernel):
    return jax.lax.conv_general_dilated(
      x, kernel[:, None, None], (1, 1, 1), "SAME", dimension_numbers=("NDHWC", "DHWIO", "NDHWC")
    )


class TapsTemporal(conv.TemporalConv):
  """The temporal conv of the first issue-24 round: one matmul per tap on the zero-padded frames,
  summed; same parameters."""

  def convolve(self, x, kernel):
    frames, pad = x.shape[1], self.kernel_size // 2
    padded = jnp.pad(x, ((0, 0), (pad, pad)) + ((0, 0),) * (x.ndim - 2))
    return sum(
      jnp.einsum("bf...c,cd->bf...d", padded[:, tap : tap + frames], kernel[tap])
      for tap in range(self.kernel_size)
    )


def _report(label, fn, args) -> None:
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  seconds = time.perf_counter() - start
  cost = compiled_stats._cost(compiled)
  table = compiled_stats.per_op_table(compiled_stats.per_op(compiled.as_text()))
  shares = ", ".join(f"{r['kind']} {r['share']:.0%}" for r in table[:4])
  print(
    f"| {label} | {cost['optimal_seconds'] * 1e3:.3f} | {cost['flops'] / 1e12:.3f} | "
    f"{cost['bytes accessed'] / 2**30:.2f} | {shares} | {seconds:.0f} |",
    flush=True,
  )


def temporal_conv(device) -> None:
  spec = jax.sharding.SingleDeviceSharding(device)
  print("| shape, temporal conv | est. ms | TFLOP | GiB | top kinds | compile s |")
  print("|---|---|---|---|---|---|")
  for shape in RESBLOCK_SHAPES:
    variants = (
      ("3D conv", Conv3dTemporal),
      ("matmul per tap", TapsTemporal),
      ("1D conv", conv.TemporalConv),
    )
    for name, layer in variants:
      conv.TemporalConv, shipped = layer, conv.TemporalConv  # what Pseudo3DConv builds
      try:
        block = resblock.ResBlock(features=shape[-1], dtype=jnp.bfloat16)
        x = jnp.zeros(shape, jnp.bfloat16)
        emb = jnp.zeros((shape[0], 1280), jnp.bfloat16)
        params = jax.eval_shape(
          lambda b=block, x=x, e=emb: nn.unbox(b.init(jax.random.key(0), x, e))
        )

        def loss(p, x, e, block=block):
          return jnp.sum(block.apply(p, x, e).astype(jnp.float32))

        args = jax.tree.map(
          lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=spec), (params, x, emb)
        )
        _report(f"{'x'.join(map(str, shape))}, {name}", jax.grad(loss, argnums=(0, 1)), args)
      finally:
        conv.TemporalConv = shipped


def _splash(q, k, v):
  """Pallas splash attention (TPU only) on [n, t, heads, d], blocks of up to 512: the candidate
  whose time the TPU compiler cannot estimate (a Mosaic custom call: no FLOPs, no cycles)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

  n, t, heads, d = q.shape
  block = min(512, t)
  mask = sm.MultiHeadMask([sm.FullMask((t, t)) for _ in range(heads)])
  sizes = sk.BlockSizes(
    block_q=block,
    block_kv_compute=block,
    block_kv=block,
    block_q_dkv=block,
    block_kv_dkv=block,
    block_kv_dkv_compute=block,
    block_q_dq=block,
    block_kv_dq=block,
  )
  kernel = jax.vmap(sk.make_splash_mha_single_device(mask, block_sizes=sizes))
  q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q * d**-0.5, k, v))
  return jnp.swapaxes(kernel(q, k, v), 1, 2)


def attention_variants(device) -> None:
  spec = jax.sharding.SingleDeviceSharding(device)
  print(
    "| [n, tokens, heads, head_dim], attention | est. ms | TFLOP | GiB | top kinds | compile s |"
  )
  print("|---|---|---|---|---|---|")
  for shape in ATTENTION_SHAPES:
    variants = [("jax.nn", jax.nn.dot_product_attention), ("attend", attention.attend)]
    if shape[1] >= 256:  # splash's blocks need sequences of 128+
      variants.append(("splash (no estimate)", _splash))
    for name, fn in variants:

      def loss(q, k, v, fn=fn):
        return jnp.sum(fn(q, k, v).astype(jnp.float32))

      a = jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=spec)
      _report(f"{'x'.join(map(str, shape))}, {name}", jax.grad(loss, argnums=(0, 1, 2)), (a, a, a))


def _group_norm_sums(x, scale, bias, groups=32, eps=1e-5):
  """GroupNorm from per-channel sums over (h, w) in float32, grouped on the small [.., c] sums:
  no [..., groups, c / groups] reshape of the activation."""
  c = x.shape[-1]
  xf = x.astype(jnp.float32)
  count = x.shape[-3] * x.shape[-2] * (c // groups)
  s1 = jnp.sum(xf, axis=(-3, -2)).reshape(x.shape[:-3] + (groups, -1)).sum(-1)
  s2 = jnp.sum(jnp.square(xf), axis=(-3, -2)).reshape(x.shape[:-3] + (groups, -1)).sum(-1)
  mean = s1 / count
  inv = jax.lax.rsqrt(jnp.maximum(s2 / count - jnp.square(mean), 0.0) + eps)
  scale_c = jnp.repeat(inv, c // groups, axis=-1) * scale
  shift_c = bias - jnp.repeat(mean, c // groups, axis=-1) * scale_c
  return (xf * scale_c[..., None, None, :] + shift_c[..., None, None, :]).astype(x.dtype)


def _group_norm_flax(x, scale, bias):
  lead, (h, w, c) = x.shape[:-3], x.shape[-3:]
  norm = nn.GroupNorm(num_groups=32, epsilon=1e-5, dtype=x.dtype)
  y = norm.apply({"params": {"scale": scale, "bias": bias}}, x.reshape((-1, h, w, c)))
  return y.reshape(lead + (h, w, c))


def group_norm(device) -> None:
  spec = jax.sharding.SingleDeviceSharding(device)
  print("| shape, GroupNorm + scale/shift + SiLU | est. ms | TFLOP | GiB | top kinds | compile s |")
  print("|---|---|---|---|---|---|")
  for shape in RESBLOCK_SHAPES:
    b, c = shape[0], shape[-1]
    for name, norm in (
      ("flax GroupNorm", _group_norm_flax),
      ("per-channel sums", _group_norm_sums),
    ):

      def loss(x, scale, bias, mod_scale, mod_shift, norm=norm):
        y = (
          norm(x, scale, bias) * (1 + mod_scale[:, None, None, None])
          + mod_shift[:, None, None, None]
        )
        return jnp.sum(nn.silu(y).astype(jnp.float32))

      args = (
        jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=spec),
        jax.ShapeDtypeStruct((c,), jnp.float32, sharding=spec),
        jax.ShapeDtypeStruct((c,), jnp.float32, sharding=spec),
        jax.ShapeDtypeStruct((b, c), jnp.bfloat16, sharding=spec),
        jax.ShapeDtypeStruct((b, c), jnp.bfloat16, sharding=spec),
      )
      _report(f"{'x'.join(map(str, shape))}, {name}", jax.grad(loss, argnums=(0, 1, 2, 3, 4)), args)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("study", choices=("temporal_conv", "attention", "group_norm"))
  parser.add_argument("--target", default="v5p:2x2x1", help="TPU topology; one chip of it is used")
  args = parser.parse_args()
  device = topologies.get_topology_desc(topology_name=args.target, platform="tpu").devices[0]
  studies = {
    "temporal_conv": temporal_conv,
    "attention": attention_variants,
    "group_norm": group_norm,
  }
  studies[args.study](device)


if __name__ == "__main__":
  main()
