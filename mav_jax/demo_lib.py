"""Library of the demo entrypoint (`python -m mav_jax.demo`): see `run_demo`."""

import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from mav_jax import diffusion
from mav_jax.diffusion.schedules import schedule_from_config
from mav_jax.models import unet_from_config
from mav_jax.utils import video_io


def run_demo(config, output: str, overwrite: bool = False) -> dict[str, Any]:
  """Trains `config.demo_steps` steps on random videos and writes one sample to `output`.

  Args:
    config: a decoder config (`configs/decoder.py`).
    output: path of the .gif or .mp4 to write; a .png contact sheet is written beside it.
    overwrite: replace existing output files instead of refusing.

  Returns:
    {"losses": per-step training losses, "output": path, "sheet": contact-sheet path,
     "num_params": parameter count}.
  """
  video_io.check_output_path(output, overwrite)
  sheet_path = os.path.splitext(output)[0] + ".png"
  if os.path.exists(sheet_path) and not overwrite:
    raise FileExistsError(
      f"{sheet_path} already exists; choose another --output or pass --overwrite"
    )

  model = unet_from_config(config.model)
  schedule = schedule_from_config(config.diffusion)
  d, b = config.data, config.batch_size
  shape = (b, d.num_frames, d.resolution, d.resolution, config.model.out_channels)
  rng = jax.random.key(config.seed)
  init_rng, data_rng, train_rng, sample_rng = jax.random.split(rng, 4)
  video_rng, emb_rng, fps_rng = jax.random.split(data_rng, 3)
  videos = jax.random.uniform(video_rng, shape, minval=-1.0, maxval=1.0)
  cond = {
    "global_embedding": jax.random.normal(emb_rng, (b, d.embedding_dim)),
    "fps": jax.random.uniform(fps_rng, (b,), minval=1.0, maxval=30.0),
  }

  def model_fn(params, z, t, c):
    return model.apply(
      {"params": params}, z, t, scalars={"fps": c["fps"]}, global_embedding=c["global_embedding"]
    )

  t0 = time.time()
  variables = jax.jit(
    lambda r: model.init(
      r,
      videos,
      jnp.zeros((b,)),
      scalars={"fps": cond["fps"]},
      global_embedding=cond["global_embedding"],
    )
  )(init_rng)
  params = nn.unbox(variables)["params"]
  n_params = sum(x.size for x in jax.tree.leaves(params))
  print(
    f"[demo] SpaceTimeUNet ({config.variant}): {n_params:,} parameters, video {shape[1:]}, "
    f"init {time.time() - t0:.1f}s",
    flush=True,
  )

  tx = optax.adamw(config.optimizer.learning_rate, weight_decay=config.optimizer.weight_decay)
  opt_state = tx.init(params)

  @jax.jit
  def train_step(params, opt_state, step):
    step_rng = jax.random.fold_in(train_rng, step)
    drop_rng, loss_rng = jax.random.split(step_rng)
    # Only the embedding is dropped for guidance; fps always conditions the model.
    c = dict(
      cond,
      global_embedding=diffusion.drop_conditioning(
        drop_rng, cond["global_embedding"], config.diffusion.cond_dropout
      ),
    )

    def loss_fn(p):
      loss, _ = diffusion.diffusion_loss(
        lambda z, t: model_fn(p, z, t, c),
        videos,
        loss_rng,
        schedule,
        target=config.diffusion.target,
        weighting=config.diffusion.weighting,
        min_snr_gamma=config.diffusion.min_snr_gamma,
      )
      return loss

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  losses = []
  for step in range(config.demo_steps):
    t0 = time.time()
    params, opt_state, loss = train_step(params, opt_state, step)
    losses.append(float(loss))
    if not np.isfinite(losses[-1]):
      raise FloatingPointError(
        f"non-finite loss {losses[-1]} at step {step}; lower --config.optimizer.learning_rate"
      )
    print(
      f"[demo] step {step + 1}/{config.demo_steps} loss {losses[-1]:.4f} ({time.time() - t0:.2f}s)",
      flush=True,
    )

  s = config.sampling
  one = jax.tree.map(lambda x: x[:1], cond)
  null = dict(one, global_embedding=jnp.zeros_like(one["global_embedding"]))
  noise = diffusion.gaussian_noise(jax.random.fold_in(sample_rng, 0), (1,) + shape[1:])

  @jax.jit
  def draw(params, noise):
    denoise = diffusion.guided_model(
      lambda z, t, c: model_fn(params, z, t, c), one, null, s.guidance_scale
    )
    return diffusion.sample(
      denoise,
      schedule,
      noise,
      jax.random.fold_in(sample_rng, 1),
      sampler=s.sampler,
      num_steps=s.num_steps,
      target=config.diffusion.target,
      eta=s.eta,
    )

  t0 = time.time()
  video = np.asarray(draw(params, noise))[0]
  print(
    f"[demo] sampled {s.sampler} x{s.num_steps} steps, guidance {s.guidance_scale} "
    f"({time.time() - t0:.1f}s)",
    flush=True,
  )
  frames = video_io.to_uint8(video)
  scale = max(1, 128 // d.resolution)
  video_io.write_video(output, frames, fps=s.fps, scale=scale)
  video_io.contact_sheet(frames, sheet_path, scale=scale)
  print(f"[demo] wrote {output} and {sheet_path}", flush=True)
  return {"losses": losses, "output": output, "sheet": sheet_path, "num_params": n_params}
