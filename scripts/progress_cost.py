r"""What a per-step progress callback costs the sampler: the tiny D^t's sampling loop timed with a
host callback in every step (`jax.debug.callback`, what the sampler's progress bar used until
issue 22) and without one, interleaved, on this machine's CPU. The sampler now has no callback
(progress lines come from the host around stage calls); this script keeps the measurement.

  .venv/bin/python scripts/progress_cost.py [--steps 20] [--batch 1,4] [--repeats 5]

Prints per-step milliseconds (median over the repeats) for each batch size and the difference.
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from mav_jax import checkpointing, diffusion, stages
from mav_jax.diffusion.schedules import schedule_from_config
from mav_jax.stages import video


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--decoder", default="checkpoints/tiny/decoder")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--batch", default="1,4")
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  config, params = checkpointing.load_model(args.decoder)
  stage = stages.get_stage("decoder")
  model = stage.make_model(config)
  params = jax.device_put(params)
  s = config.sampling.copy_and_resolve_references()
  with s.unlocked():
    s.num_steps = args.steps
  r, f = int(config.data.resolution), int(config.data.num_frames)
  calls = []

  def progress(i):
    calls.append(int(i))

  schedule = schedule_from_config(config.diffusion)

  def make(with_progress: bool, b: int):
    shape = (b, f, r, r, 3)

    def fn(params, embedding, rng):
      cond = {"embedding": embedding, "scalars": {"fps": jnp.full((b,), 4.0)}, "extra": None}

      def denoise(z, t):  # the conditional prediction, plus the callback once per step
        if with_progress:
          jax.debug.callback(progress, t[0])
        kwargs = video.VideoStage._net_kwargs(cond, False)
        return model.net.apply({"params": params}, z, t, **kwargs)

      noise_rng, step_rng = jax.random.split(rng)
      noise = diffusion.gaussian_noise(noise_rng, shape)
      return diffusion.sample(
        denoise,
        schedule,
        noise,
        step_rng,
        sampler=s.sampler,
        num_steps=s.num_steps,
        target=config.diffusion.target,
      )

    return jax.jit(fn)

  print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, {args.steps} steps, {r}px x {f}")
  for b in (int(x) for x in args.batch.split(",")):
    embedding = jnp.asarray(np.random.default_rng(0).normal(size=(b, 64)), jnp.float32)
    embedding = embedding[:, : int(config.conditioning.embedding_dim)]
    fns = {p: make(p, b) for p in (False, True)}
    for fn in fns.values():  # compile
      jax.block_until_ready(fn(params, embedding, jax.random.key(0)))
    times = {False: [], True: []}
    for rep in range(args.repeats):
      for p, fn in fns.items():
        start = time.perf_counter()
        jax.block_until_ready(fn(params, embedding, jax.random.key(rep)))
        times[p].append((time.perf_counter() - start) / args.steps * 1e3)
    off, on = (statistics.median(times[p]) for p in (False, True))
    print(
      f"batch {b}: {off:.2f} ms/step without a callback, {on:.2f} ms/step with one per step "
      f"({on - off:+.2f} ms, {100 * (on - off) / off:+.1f}%); runs without {times[False]}, "
      f"with {times[True]}"
    )
  assert calls, "the callback never ran"


if __name__ == "__main__":
  main()
