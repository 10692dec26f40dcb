"""The pure training step: loss with ignored targets, AdamW, schedules, gradient accumulation.

The train state is a plain dict (see `init_state`):
  {"step": int32 (), "params": nested dict of fp32 arrays, "opt_state": optax state,
   "rng": uint32 key data}
Every leaf has an explicit NamedSharding: parameters from their logical axes through the rules
table, optimizer moments like the parameter they track, scalars replicated. `make_train_step`
jits `train_step` with those shardings in and out and donates the state.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from t6_jax import sharding as sharding_lib
from t6_jax.config import Config, TrainConfig
from t6_jax.model import init_params, model_from_params, param_axes
from t6_jax.model.transformer import Transformer

IGNORE = -1  # target id that contributes no loss
SCHEDULES = ("cosine", "wsd", "constant")


def validate(cfg: Config) -> None:
  """Checks the train and mesh sections; raises ValueError naming the fix."""
  t = cfg.train
  if t.schedule not in SCHEDULES:
    raise ValueError(f"train.schedule={t.schedule!r}; choose one of {', '.join(SCHEDULES)}")
  for key in ("steps", "batch_size", "seq_len", "grad_accum", "log_every", "eval_every"):
    if getattr(t, key) <= 0:
      raise ValueError(f"train.{key} must be positive, got {getattr(t, key)}")
  if t.batch_size % t.grad_accum:
    raise ValueError(f"train.batch_size={t.batch_size} must be a multiple of "
                     f"train.grad_accum={t.grad_accum} (each micro-batch has "
                     f"batch_size / grad_accum rows)")
  if t.seq_len > cfg.model.max_seq_len:
    raise ValueError(f"train.seq_len={t.seq_len} exceeds model.max_seq_len="
                     f"{cfg.model.max_seq_len}; shorten train.seq_len or raise the model's")
  if not 0.0 <= t.decay_fraction <= 1.0:
    raise ValueError(f"train.decay_fraction={t.decay_fraction} must lie in [0, 1]")
  sharding_lib.rules_table(cfg.mesh.rules)


# --------------------------------------------------------------------------------------------
# Schedules and optimizer


def make_schedule(t: TrainConfig):
  """Learning rate after `count` optimizer updates (count = 0 for the first step).

  Warmup: lr * (count + 1) / warmup_steps for count < warmup_steps (never 0, as nanoGPT).
  cosine: min_lr + (lr - min_lr) * (1 + cos(pi * p)) / 2, p = (count - warmup) / (steps -
    warmup) clipped to [0, 1], so min_lr is reached at the last step.
  wsd: lr until the last `decay_fraction * steps` steps, then linear to min_lr at `steps`.
  constant: lr after the warmup.
  """
  warmup = max(t.warmup_steps, 0)
  decay_steps = max(t.steps - warmup, 1)
  decay_start = t.steps - max(int(round(t.decay_fraction * t.steps)), 1)

  def schedule(count):
    count = jnp.asarray(count, jnp.float32)
    warm = t.lr * (count + 1) / max(warmup, 1)
    if t.schedule == "cosine":
      p = jnp.clip((count - warmup) / decay_steps, 0.0, 1.0)
      after = t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + jnp.cos(jnp.pi * p))
    elif t.schedule == "wsd":
      p = jnp.clip((count - decay_start) / max(t.steps - decay_start, 1), 0.0, 1.0)
      after = t.lr + (t.min_lr - t.lr) * p
    else:
      after = jnp.full_like(count, t.lr)
    return jnp.where(count < warmup, warm, after)

  return schedule


def make_optimizer(t: TrainConfig) -> optax.GradientTransformation:
  """AdamW with weight decay on every parameter after clipping at the global norm
  (REFERENCE.md section 5). optax.adamw decays by lr * wd * p, as torch.optim.AdamW."""
  return optax.chain(
      optax.clip_by_global_norm(t.clip_norm),
      optax.adamw(make_schedule(t), b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay))


# --------------------------------------------------------------------------------------------
# Loss


def loss_sums(params, cfg: Config, batch: dict[str, jax.Array]):
  """(sum of token cross-entropies, number of counted tokens); targets == -1 count nothing."""
  model = model_from_params(cfg.model, params)
  logits_BxTxV = model(batch["inputs"], batch.get("positions"), batch.get("segment_ids"))
  targets_BxT = batch["targets"]
  keep_BxT = targets_BxT != IGNORE
  nll_BxT = optax.softmax_cross_entropy_with_integer_labels(
      logits_BxTxV.astype(jnp.float32), jnp.where(keep_BxT, targets_BxT, 0))
  return jnp.sum(jnp.where(keep_BxT, nll_BxT, 0.0)), jnp.sum(keep_BxT).astype(jnp.float32)


def split_micro(batch: dict[str, jax.Array], k: int) -> dict[str, jax.Array]:
  """(B, ...) -> (k, B/k, ...) where micro-batch j holds rows j, j+k, j+2k, ...

  Row i*k + j goes to micro-batch j, so each device's contiguous block of rows stays on that
  device: no data moves between devices.
  """
  def split(x):
    b = x.shape[0]
    x = x.reshape((b // k, k) + x.shape[1:])
    x = jnp.moveaxis(x, 1, 0)
    return sharding_lib.constrain(x, (None, "batch") + (None,) * (x.ndim - 2))
  return jax.tree.map(split, batch)


def grads_and_sums(params, cfg: Config, batch):
  """Gradient of the summed loss, the summed loss and the token count, accumulated over
  `train.grad_accum` micro-batches with lax.scan. Summing (not averaging) per micro-batch makes
  k micro-batches give exactly the big batch's mean after the final division."""
  grad_fn = jax.value_and_grad(loss_sums, has_aux=True)
  k = cfg.train.grad_accum
  if k == 1:
    (loss_sum, count), grads = grad_fn(params, cfg, batch)
    return grads, loss_sum, count

  def body(carry, micro):
    g_acc, l_acc, n_acc = carry
    (loss_sum, count), grads = grad_fn(params, cfg, micro)
    g_acc = jax.tree.map(jnp.add, g_acc, grads)
    return (g_acc, l_acc + loss_sum, n_acc + count), None

  zeros = jax.tree.map(jnp.zeros_like, params)
  (grads, loss_sum, count), _ = jax.lax.scan(body, (zeros, 0.0, 0.0), split_micro(batch, k))
  return grads, loss_sum, count


def train_step(state: dict, batch: dict[str, jax.Array], *, cfg: Config):
  """One optimizer update. Returns (new state, metrics of this step).

  A non-finite loss or gradient leaves params and optimizer state unchanged (metrics still
  report it), so the state in memory and in any checkpoint stays the last good one.
  """
  grads, loss_sum, count = grads_and_sums(state["params"], cfg, batch)
  count = jnp.maximum(count, 1.0)
  grads = jax.tree.map(lambda g: g / count, grads)
  loss = loss_sum / count
  grad_norm = optax.global_norm(grads)
  optimizer = make_optimizer(cfg.train)
  updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
  new_state = {
      "step": state["step"] + 1,
      "params": jax.tree.map(keep, params, state["params"]),
      "opt_state": jax.tree.map(keep, opt_state, state["opt_state"]),
      "rng": state["rng"],
  }
  metrics = {"loss": loss, "grad_norm": grad_norm, "tokens": count,
             "lr": make_schedule(cfg.train)(state["step"])}
  return new_state, metrics


def eval_step(params, batch, *, cfg: Config):
  """(summed loss, token count) of one batch, for validation loss over several batches."""
  return loss_sums(params, cfg, batch)


# --------------------------------------------------------------------------------------------
# State creation with explicit shardings


def _fresh_state(cfg: Config) -> dict:
  params = init_params(cfg.model, cfg.train.seed)
  return {
      "step": jnp.zeros((), jnp.int32),
      "params": params,
      "opt_state": make_optimizer(cfg.train).init(params),
      "rng": jax.random.key_data(jax.random.key(cfg.train.seed)),
  }


def _opt_state_shardings(abstract_opt, param_shard: dict, mesh) -> Any:
  """Optimizer leaves that track a parameter (Adam's mu, nu) shard like it; the rest (count)
  are replicated explicitly, so no leaf is left for the compiler to put on one device."""
  by_path = {tuple(k.key for k in path): s
             for path, s in jax.tree_util.tree_leaves_with_path(param_shard)}
  replicated = NamedSharding(mesh, P())

  def pick(path, leaf):
    keys = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
    for start in range(len(keys)):
      s = by_path.get(keys[start:])
      if s is not None and len(s.spec) <= leaf.ndim:
        return s
    return replicated

  return jax.tree_util.tree_map_with_path(pick, abstract_opt)


def state_shardings(cfg: Config, mesh) -> dict:
  abstract = jax.eval_shape(functools.partial(_fresh_state, cfg))
  params = sharding_lib.param_shardings(param_axes(cfg.model), abstract["params"], mesh,
                                        cfg.mesh.rules)
  replicated = NamedSharding(mesh, P())
  return {
      "step": replicated,
      "params": params,
      "opt_state": _opt_state_shardings(abstract["opt_state"], params, mesh),
      "rng": replicated,
  }


def abstract_state(cfg: Config, mesh) -> dict:
  """ShapeDtypeStructs with shardings of the train state (restore targets, AOT compiles)."""
  abstract = jax.eval_shape(functools.partial(_fresh_state, cfg))
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract, state_shardings(cfg, mesh))


def model_graphdef(cfg: Config):
  return nnx.split(nnx.eval_shape(lambda: Transformer(cfg.model, nnx.Rngs(0))))[0]


def init_state(cfg: Config, mesh):
  """(graphdef, state, shardings): a fresh train state created directly in its shardings, so
  no device ever holds a full copy of the parameters."""
  shardings = state_shardings(cfg, mesh)
  with sharding_lib.activate(mesh, cfg.mesh.rules):
    state = jax.jit(functools.partial(_fresh_state, cfg), out_shardings=shardings)()
  return model_graphdef(cfg), state, shardings


def batch_shardings(cfg: Config, mesh, keys=("inputs", "targets")) -> dict:
  s = sharding_lib.batch_sharding(mesh, cfg.train.batch_size // cfg.train.grad_accum)
  return {k: s for k in keys}


def abstract_batch(cfg: Config, mesh, keys=("inputs", "targets")) -> dict:
  shape = (cfg.train.batch_size, cfg.train.seq_len)
  return {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=s)
          for k, s in batch_shardings(cfg, mesh, keys).items()}


@functools.lru_cache(maxsize=16)
def _jitted_steps(cfg: Config, mesh, batch_keys: tuple[str, ...]):
  """(train step, eval step) jitted for this config and mesh; cached so that a second run in
  the same process (a resume, a test) reuses the compiled programs."""
  return _jit_steps(cfg, mesh, state_shardings(cfg, mesh), batch_keys)


def _jit_steps(cfg: Config, mesh, shardings: dict, batch_keys: tuple[str, ...]):
  replicated = NamedSharding(mesh, P())
  batch_in = batch_shardings(cfg, mesh, batch_keys)
  train = jax.jit(functools.partial(train_step, cfg=cfg),
                  in_shardings=(shardings, batch_in), out_shardings=(shardings, replicated),
                  donate_argnums=0)
  evaluate = jax.jit(functools.partial(eval_step, cfg=cfg),
                     in_shardings=(shardings["params"], batch_in), out_shardings=replicated)
  return train, evaluate


class TrainStep:
  """The jitted step bound to a mesh: `state, metrics = step(state, batch)`.

  In and out shardings are explicit (the state's from `state_shardings` unless given, the
  batch split over the data-parallel axes) and the state is donated. The mesh and rules table
  are entered around every call so that tracing (first call, or `lower`) sees them; compiled
  calls pay only the context switch.
  """

  def __init__(self, cfg: Config, mesh, shardings: dict | None = None,
               batch_keys=("inputs", "targets")):
    self.cfg, self.mesh = cfg, mesh
    if shardings is None:
      self.jitted, self.eval_jitted = _jitted_steps(cfg, mesh, tuple(batch_keys))
    else:
      self.jitted, self.eval_jitted = _jit_steps(cfg, mesh, shardings, tuple(batch_keys))

  def __call__(self, state, batch):
    with sharding_lib.activate(self.mesh, self.cfg.mesh.rules):
      return self.jitted(state, batch)

  def eval(self, params, batch):
    with sharding_lib.activate(self.mesh, self.cfg.mesh.rules):
      return self.eval_jitted(params, batch)

  def lower(self, state, batch):
    with sharding_lib.activate(self.mesh, self.cfg.mesh.rules):
      return self.jitted.lower(state, batch)


def tokens_per_step(cfg: Config) -> int:
  return cfg.train.batch_size * cfg.train.seq_len


def num_params(params) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(params))
