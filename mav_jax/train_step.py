"""The train step and what it needs: the mesh, the model, a sharded train state, and the jitted
step itself (pure, state donated). Imports no logging or data-loading library, so the benchmark
(`mav_jax.benchmark`) compiles exactly the step `mav_jax.train` runs without them.
"""

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
  """(mesh, model, stage, tx, state shardings, abstract state, create fn) for a config.

  When `mesh.ici` leaves both FSDP axes to be chosen (-1, -1), their split is the one that divides
  this model's train state most evenly (`sharding.best_fsdp_split`, from shapes alone)."""
  stage = stages.get_stage(config.stage)
  model = stage.make_model(config)
  tx = train_state.make_optimizer(config)
  create = create_state_fn(model, stage, config, tx)
  boxed = jax.eval_shape(create, jax.random.key(config.seed))
  rules = sharding.strategy_rules(config.sharding.strategy)

  def split_fsdp(n):
    others = {a: s for a, s in zip(config.mesh.axes, config.mesh.ici, strict=True) if s > 0}
    return sharding.best_fsdp_split(boxed, rules, others, n)

  mesh = mesh_lib.create_mesh(config.mesh, devices, split_fsdp)
  shardings = sharding.tree_shardings(boxed, rules, mesh)
  abstract = nn.unbox(boxed)
  return mesh, model, stage, tx, shardings, abstract, create


def check_state_split(config, abstract, shardings, mesh, log) -> None:
  """Logs how evenly the train state is split; stops (UserError) above
  `sharding.max_state_ratio`, naming the arrays left whole and the fix."""
  strategy = config.sharding.strategy
  held, even, ratio, whole = sharding.state_report(abstract, shardings, strategy, mesh)
  gib = 2.0**30
  named = sharding.describe_whole(whole)
  log(
    f"train state per device {held / gib:.2f} GiB, {ratio:.3f}x an even split over the devices "
    f"{strategy} shards it over ({even / gib:.2f} GiB); largest arrays left whole: {named}"
  )
  limit = config.sharding.get("max_state_ratio", 0)
  if limit and ratio > limit:
    raise errors.UserError(
      f"the {strategy} strategy on mesh {dict(mesh.shape)} leaves {ratio:.2f}x an even share of "
      f"the train state on each device (over sharding.max_state_ratio={limit}): the mesh axes "
      f"do not divide these arrays' dimensions: {named}. Give mesh sizes that divide them "
      f"(fsdp and fsdp_transpose both -1 lets the trainer split what the other axes leave, e.g. "
      f"--config.mesh.ici='(1,-1,-1,1)': data x fsdp x fsdp_transpose x tensor; plan meshes in "
      f"seconds with python -m mav_jax.benchmark --memory_only), use the fsdp strategy, or raise "
      f"sharding.max_state_ratio"
    )


def init_state(create, shardings, config) -> TrainState:
  """A fresh state, created by one jitted function straight into its shardings (never whole)."""
  init = jax.jit(lambda rng: nn.unbox(create(rng)), out_shardings=shardings)
  return init(jax.random.key(config.seed))


def state_from_image_checkpoint(state: TrainState, shardings, path: str) -> TrainState:
  """Loads an image-stage checkpoint's params into a fresh video state (temporal layers stay at
  their identity init); EMA starts from the same values, the optimizer from scratch.

  The image checkpoint's parameter names and shapes come from its metadata first; each image
  parameter is then restored straight into the sharding of the video parameter it becomes, each
  host reading only its devices' slices (parameters only, not the optimizer state); the merge runs
  under jit with the video shardings, so the video model is never gathered onto one host.
  """
  saved = traverse_util.flatten_dict(checkpointing.params_metadata(path))
  target = traverse_util.flatten_dict(shardings.params)
  missing = sorted("/".join(p) for p in saved if p not in target)
  if missing:
    raise errors.UserError(
      f"{path}: image parameters missing from the video model (do the configs match?): "
      f"{missing[:10]}"
    )
  video = traverse_util.flatten_dict(nn.unbox(state.params))
  mismatched = [
    f"{'/'.join(p)}: image {tuple(m.shape)} vs video {video[p].shape}"
    for p, m in saved.items()
    if tuple(m.shape) != video[p].shape
  ]
  if mismatched:
    raise errors.UserError(
      f"{path}: parameter shapes differ between image and video model: {mismatched[:10]}"
    )
  placed = checkpointing.restore_params(
    path, shardings=traverse_util.unflatten_dict({p: target[p] for p in saved})
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


def make_train_step(model, stage, config, tx, param_shardings=None):
  """train_step(state, batch) -> (state, metrics); non-finite steps leave the state unchanged.

  The loss is differentiated with respect to the trained parameters only (`train.trainable`,
  train_state.is_trained): a frozen parameter enters the loss as a constant, so its weight
  gradient is never computed; the optimizer gets zeros in its place (its state keeps the whole
  tree's layout, and `set_to_zero` leaves the parameter as it is). The metric `grad_norm` and the
  clipping norm are the global norm of the trained parameters' gradients.

  With `train.grad_accum_steps` k > 1 the batch is split into k micro-batches (`_microbatches`),
  micro-batch i drawing its noise from fold_in(rng, i); the loss and gradients are the means of
  the k micro-batches'. `param_shardings` (the params' NamedShardings, as in the state's) keeps
  the summed gradients of the scan's carry sharded like the parameters.
  """
  k = config.train.grad_accum_steps
  if k < 1:
    raise errors.UserError(f"train.grad_accum_steps must be >= 1, got {k}")
  schedule = train_state.learning_rate_schedule(config.optimizer, config.train.num_steps)
  trainable = config.train.trainable
  carry_shardings = None
  if param_shardings is not None:
    carry_shardings = traverse_util.flatten_dict(param_shardings)

  def split(params):
    """params -> (trained, frozen): flat {path: array} dicts."""
    flat = traverse_util.flatten_dict(params)
    trained = {p: v for p, v in flat.items() if train_state.is_trained(p, trainable)}
    return trained, {p: v for p, v in flat.items() if p not in trained}

  def constrain(grads):
    if carry_shardings is None:
      return grads
    return {p: jax.lax.with_sharding_constraint(g, carry_shardings[p]) for p, g in grads.items()}

  def loss_and_grads(trained, fixed, batch, rng, frozen):
    def loss(trained):
      params = traverse_util.unflatten_dict({**trained, **jax.lax.stop_gradient(fixed)})
      return stage.loss_fn(model, config, params, batch, rng, frozen=frozen)

    return jax.value_and_grad(loss, has_aux=True)(trained)

  def train_step(state: TrainState, batch, frozen=None):
    """`frozen`: parameters of frozen models the loss reads (e.g. CLIP's), not trained."""
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    trained, fixed = split(state.params)
    if k == 1:
      (loss, _), grads = loss_and_grads(trained, fixed, batch, rng, frozen)
    else:

      def body(carry, inputs):
        i, micro = inputs
        (micro_loss, _), g = loss_and_grads(
          trained, fixed, micro, jax.random.fold_in(rng, i), frozen
        )
        total, summed = carry
        return (total + micro_loss, constrain(jax.tree.map(jnp.add, summed, g))), None

      zeros = (jnp.zeros(()), constrain(jax.tree.map(jnp.zeros_like, trained)))
      (loss, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(k), _microbatches(batch, k)))
      loss, grads = loss / k, jax.tree.map(lambda g: g / k, grads)
    grad_norm = train_state.global_norm(grads)
    full_grads = traverse_util.unflatten_dict(
      {**grads, **{p: jnp.zeros_like(v) for p, v in fixed.items()}}
    )
    updates, opt_state = tx.update(full_grads, state.opt_state, state.params)
    params = jax.tree.map(jnp.add, state.params, updates)
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
