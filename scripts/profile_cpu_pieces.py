r"""Micro-benchmarks behind the README's performance section, on the local CPU:

  XLA_FLAGS=--xla_cpu_experimental_onednn_custom_call=true .venv/bin/python scripts/profile_cpu_pieces.py

1. The temporal conv, forward + backward, at the throughput variant's four levels: a (3, 1, 1) 3D
   conv against one channel matmul per tap (mav_jax.models.conv.TemporalConv's two implementations).
2. The optimizer update of a 62.8M-parameter tree (the throughput variant's size): plain Adam, then
   adding what the train step does (global-norm clipping + AdamW, EMA, the non-finite guard, the
   logged norms), with the guard as a select over the whole state or as a `lax.cond`.
3. The 3x3 spatial conv, forward + backward, at the shapes of `throughput_efficient`'s levels
   (frames halved at each: 16, 8, 4, 2 images of 32x32 ... 4x4): XLA's conv against one im2col
   matmul (mav_jax.models.common.spatial_conv's "conv" and "im2col" implementations).

  --only temporal|optimizer|spatial runs one of them.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import optax

from mav_jax.models.common import spatial_conv
from mav_jax.models.conv import TemporalConv


def timed(fn, *args, repeats: int = 10) -> float:
  """Mean milliseconds per call after one warm-up call (the compile)."""
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  for _ in range(repeats):
    jax.block_until_ready(fn(*args))
  return (time.perf_counter() - start) / repeats * 1000


def temporal_convs() -> None:
  for shape in [(2, 8, 32, 32, 64), (2, 8, 16, 16, 128), (2, 8, 8, 8, 256), (2, 8, 4, 4, 512)]:
    x = jax.random.normal(jax.random.key(0), shape)
    c = shape[-1]
    params = {"kernel": jax.random.normal(jax.random.key(1), (3, c, c)) / c, "bias": jnp.zeros(c)}
    row = []
    for implementation in ("conv", "matmul"):
      conv = TemporalConv(3, implementation)
      loss = lambda p, x, conv=conv: jnp.sum(conv.apply({"params": p}, x) ** 2)  # noqa: E731
      row.append(timed(jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), params, x))
    print(f"temporal conv {shape}: 3D conv {row[0]:.1f} ms, matmul per tap {row[1]:.1f} ms")


def optimizer_updates() -> None:
  sizes = [512 * 512 * 9] * 20 + [256 * 256 * 9] * 10 + [128 * 128 * 9] * 10
  sizes += [64 * 64 * 9] * 10 + [512 * 512] * 30
  params = {f"p{i}": jnp.full((s,), 0.01) for i, s in enumerate(sizes)}
  grads = jax.tree.map(lambda p: p * 0.1, params)
  print(f"optimizer updates of {sum(sizes):,} float32 parameters (donated state):")

  def norm(tree):
    return jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(tree)))

  def make(clip: bool, ema: bool, guard: str, norms: bool):
    tx = (
      optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-4)) if clip else optax.adam(1e-4)
    )

    def update(p, o, e, g):
      u, o = tx.update(g, o, p)
      p2 = jax.tree.map(jnp.add, p, u)
      e = jax.tree.map(lambda e, p: 0.999 * e + 0.001 * p, e, p2) if ema else e
      return (p2, o, e), ((norm(p2), norm(u)) if norms else (0.0, 0.0))

    def step(p, o, e, g):
      if guard == "none":
        return update(p, o, e, g)
      finite = jnp.isfinite(norm(g))
      if guard == "select":
        new, logged = update(p, o, e, g)
        return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, (p, o, e)), logged
      keep = lambda p, o, e, g: ((p, o, e), (jnp.float32(0), jnp.float32(0)))  # noqa: E731
      return jax.lax.cond(finite, update, keep, p, o, e, g)

    return tx, jax.jit(step, donate_argnums=(0, 1, 2))

  for name, options in [
    ("plain Adam", (False, False, "none", False)),
    ("clip + AdamW", (True, False, "none", False)),
    ("clip + AdamW + EMA", (True, True, "none", False)),
    ("clip + AdamW + EMA + norms", (True, True, "none", True)),
    ("... + guard as select (the train step today)", (True, True, "select", True)),
    ("... + guard as lax.cond", (True, True, "cond", True)),
  ]:
    tx, step = make(*options)
    state = jax.tree.map(jnp.copy, (params, tx.init(params), params))
    state, _ = step(*state, grads)
    jax.block_until_ready(state)
    start = time.perf_counter()
    for _ in range(5):
      state, _ = step(*state, grads)
      jax.block_until_ready(state)
    print(f"  {name}: {(time.perf_counter() - start) / 5 * 1000:.0f} ms")


# (input [images, h, w, c], output channels): throughput_efficient's 3x3 convs, level by level.
SPATIAL_CONVS = [
  ((16, 32, 32, 32), 32),
  ((16, 32, 32, 64), 32),
  ((8, 16, 16, 32), 128),
  ((8, 16, 16, 128), 128),
  ((8, 16, 16, 256), 128),
  ((4, 8, 8, 128), 256),
  ((4, 8, 8, 256), 256),
  ((4, 8, 8, 512), 256),
  ((2, 4, 4, 256), 512),
  ((2, 4, 4, 512), 512),
  ((2, 4, 4, 1024), 512),
]


def spatial_convs() -> None:
  for shape, out in SPATIAL_CONVS:
    x = jax.random.normal(jax.random.key(0), shape)
    row = []
    for implementation in ("conv", "im2col"):
      conv = spatial_conv(
        out, implementation=implementation, name="conv", dtype=jnp.float32, param_dtype=jnp.float32
      )
      params = conv.init(jax.random.key(1), x)["params"]
      loss = lambda p, x, conv=conv: jnp.sum(conv.apply({"params": p}, x) ** 2)  # noqa: E731
      row.append(timed(jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), params, x))
    print(
      f"spatial 3x3 conv {shape} -> {out}: XLA conv {row[0]:.1f} ms, im2col matmul {row[1]:.1f} ms"
    )


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--only", choices=("temporal", "optimizer", "spatial"))
  only = parser.parse_args().only
  for name, run in (
    ("temporal", temporal_convs),
    ("optimizer", optimizer_updates),
    ("spatial", spatial_convs),
  ):
    if only in (None, name):
      run()
