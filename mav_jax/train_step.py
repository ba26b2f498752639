"""The train step and what it needs: the mesh, the model, a sharded train state, and the jitted
step itself (pure, state donated). Imports no logging or data-loading library, so the benchmark
(`mav_jax.benchmark`) compiles exactly the step `mav_jax.train` runs without them.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import logging
from flax import traverse_util

from mav_jax import checkpointing, errors, stages, train_state
from mav_jax.models import inflate_image_params
from mav_jax.parallel import mesh as mesh_lib
from mav_jax.parallel import sharding

TrainState = train_state.TrainState


# ---------------------------------------------------------------------------------------------
# Set-up: the mesh, the model, and a train state initialised directly into its shardings.
# ---------------------------------------------------------------------------------------------


def create_state_fn(model, stage, config, tx):
  """rng -> boxed TrainState (params boxed with logical names, so shardings can be derived)."""

  def create(rng):
    params = stage.init(model, config, rng)
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      ema_params=params,
      opt_state=tx.init(params),
      rng=jax.random.key_data(jax.random.key(config.seed)),
    )

  return create


def setup(config, devices=None):
  """(mesh, model, stage, tx, state shardings, abstract state, create fn) for a config."""
  mesh = mesh_lib.create_mesh(config.mesh, devices)
  stage = stages.get_stage(config.stage)
  model = stage.make_model(config)
  tx = train_state.make_optimizer(config)
  create = create_state_fn(model, stage, config, tx)
  boxed = jax.eval_shape(create, jax.random.key(config.seed))
  shardings = sharding.tree_shardings(
    boxed, sharding.strategy_rules(config.sharding.strategy), mesh
  )
  abstract = nn.unbox(boxed)
  return mesh, model, stage, tx, shardings, abstract, create


def init_state(create, shardings, config) -> TrainState:
  """A fresh state, created by one jitted function straight into its shardings (never whole)."""
  init = jax.jit(lambda rng: nn.unbox(create(rng)), out_shardings=shardings)
  return init(jax.random.key(config.seed))


def state_from_image_checkpoint(state: TrainState, shardings, path: str) -> TrainState:
  """Loads an image-stage checkpoint's params into a fresh video state (temporal layers stay at
  their identity init); EMA starts from the same values, the optimizer from scratch.

  The image parameters are read on each host (parameters only, not the optimizer state), each
  array placed straight into the sharding of the video parameter it becomes; the merge runs under
  jit with the video shardings, so the video model is never gathered onto one host.
  """
  image = traverse_util.flatten_dict(checkpointing.restore_params(path))
  target = traverse_util.flatten_dict(shardings.params)
  missing = sorted("/".join(p) for p in image if p not in target)
  if missing:
    raise errors.UserError(
      f"{path}: image parameters missing from the video model (do the configs match?): "
      f"{missing[:10]}"
    )
  placed = sharding.place_host_tree(
    traverse_util.unflatten_dict(image),
    traverse_util.unflatten_dict({p: target[p] for p in image}),
  )

  def merge(image_params, video_params):
    return inflate_image_params(image_params, video_params)[0]

  # Two outputs: params and EMA are donated to the step separately and must not share buffers.
  params, ema = jax.jit(
    lambda i, v: (merge(i, v), merge(i, v)), out_shardings=(shardings.params, shardings.ema_params)
  )(placed, state.params)
  logging.info("initialised the video model from the image checkpoint %s", path)
  return state.replace(params=params, ema_params=ema)


# ---------------------------------------------------------------------------------------------
# The train step: pure, jitted once with explicit shardings, state donated.
# ---------------------------------------------------------------------------------------------


def _microbatches(batch, k: int):
  """[b, ...] -> [k, b/k, ...], example i of micro-batch j being b-index i*k + j (keeps each
  device's examples on that device)."""

  def split(x):
    if x.shape[0] % k:
      raise errors.UserError(f"batch {x.shape[0]} is not divisible by grad_accum_steps {k}")
    return jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)

  return jax.tree.map(split, batch)


def make_train_step(model, stage, config, tx):
  """train_step(state, batch) -> (state, metrics); non-finite steps leave the state unchanged."""
  k = config.train.grad_accum_steps
  if k < 1:
    raise errors.UserError(f"train.grad_accum_steps must be >= 1, got {k}")
  schedule = train_state.learning_rate_schedule(config.optimizer, config.train.num_steps)

  def loss_and_grads(params, batch, rng, frozen):
    loss = functools.partial(stage.loss_fn, model, config, frozen=frozen)
    return jax.value_and_grad(loss, has_aux=True)(params, batch, rng)

  def train_step(state: TrainState, batch, frozen=None):
    """`frozen`: parameters of frozen models the loss reads (e.g. CLIP's), not trained."""
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    if k == 1:
      (loss, _), grads = loss_and_grads(state.params, batch, rng, frozen)
    else:

      def body(carry, inputs):
        i, micro = inputs
        (micro_loss, _), g = loss_and_grads(state.params, micro, jax.random.fold_in(rng, i), frozen)
        return jax.tree.map(jnp.add, carry, (micro_loss, g)), None

      zeros = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, state.params))
      (loss, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(k), _microbatches(batch, k)))
      loss, grads = loss / k, jax.tree.map(lambda g: g / k, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = jax.tree.map(jnp.add, state.params, updates)
    grad_norm = train_state.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new = state.replace(
      step=state.step + 1,
      params=params,
      ema_params=train_state.ema_update(
        state.ema_params, params, state.step, config.train.ema_decay
      ),
      opt_state=opt_state,
    )
    # A non-finite step changes nothing (the host then stops the run): no checkpoint holds NaN.
    new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
    metrics = {
      "loss": loss,
      "grad_norm": grad_norm,
      "param_norm": train_state.global_norm(params),
      "update_norm": train_state.global_norm(updates),
      "learning_rate": schedule(state.step),
      "finite": finite,
    }
    return new, metrics

  return train_step


def jit_train_step(train_step, mesh, state_shardings, frozen_shardings=None):
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.jit(
    train_step,
    in_shardings=(state_shardings, sharding.batch_sharding(mesh), frozen_shardings),
    out_shardings=(state_shardings, replicated),
    donate_argnums=0,
  )
