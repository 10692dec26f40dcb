"""The pure training step: loss with ignored targets, AdamW, schedules, gradient accumulation.

The train state is a plain dict (see `init_state`):
  {"step": int32 (), "params": nested dict of fp32 arrays, "opt_state": optax state}
Every leaf has an explicit NamedSharding: parameters from their logical axes through the rules
table (mesh.rules), optimizer moments like the parameter they track (found by
optax.tree_utils.tree_map_params), every other leaf (counters) replicated. `make_train_step`
jits `train_step` with those shardings in and out and donates the state.
"""

from __future__ import annotations

import dataclasses
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
from t6_jax.model import init_params, model_from_params, param_shardings
from t6_jax.model.placement import padded_in_step
from t6_jax.model.transformer import Transformer
from t6_jax.train import loss as loss_lib

IGNORE = loss_lib.IGNORE  # target id that contributes no loss
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


def make_schedule(t: TrainConfig) -> optax.Schedule:
  """Learning rate after `count` optimizer updates (count = 0 for the first step).

  Warmup: lr * (count + 1) / warmup_steps for count < warmup_steps (never 0, as nanoGPT).
  cosine: min_lr + (lr - min_lr) * (1 + cos(pi * p)) / 2, p = (count - warmup) / (steps -
    warmup) clipped to [0, 1], so min_lr is reached at the last step.
  wsd: lr until the last `decay_fraction * steps` steps, then linear to min_lr at `steps`.
  constant: lr after the warmup.
  """
  warmup = max(t.warmup_steps, 0)
  w = max(warmup, 1)
  # lr (c + 1) / w for c < warmup: a line from lr / w rising by lr / w per step.
  warm = optax.linear_schedule(t.lr / w, t.lr * (w + 1) / w, w)
  if t.schedule == "cosine":
    after = optax.cosine_decay_schedule(t.lr, max(t.steps - warmup, 1),
                                        alpha=t.min_lr / t.lr if t.lr else 0.0)
    return optax.join_schedules([warm, after], [warmup])
  if t.schedule == "wsd":
    decay = max(int(round(t.decay_fraction * t.steps)), 1)
    decay_start = t.steps - decay
    begin = max(decay_start, warmup)  # a decay that starts inside the warmup goes on after it
    at_begin = t.lr + (t.min_lr - t.lr) * min((begin - decay_start) / decay, 1.0)
    linear = optax.linear_schedule(at_begin, t.min_lr, decay_start + decay - begin)
    return optax.join_schedules([warm, optax.constant_schedule(t.lr), linear],
                                [warmup, begin])
  return optax.join_schedules([warm, optax.constant_schedule(t.lr)], [warmup])


def make_optimizer(t: TrainConfig) -> optax.GradientTransformation:
  """AdamW with weight decay on every parameter after clipping at the global norm (the
  paper's recipe, docs/training.md). optax.adamw decays by lr * wd * p, as torch.optim.AdamW."""
  return optax.chain(
      optax.clip_by_global_norm(t.clip_norm),
      optax.adamw(make_schedule(t), b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay))


# --------------------------------------------------------------------------------------------
# Loss


def objective_sums(params, cfg: Config, batch: dict[str, jax.Array], z_loss: float = 0.0):
  """(summed objective, (sum of token cross-entropies, number of counted tokens)); targets
  == -1 count nothing. The objective is the cross-entropy plus z_loss * logsumexp^2 of each
  counted token (train.z_loss; the cross-entropy itself when 0), and only it has a gradient.

  The tied LM head and the loss run fused over chunks of the sequence (train/loss.py), so the
  full (B, T, V) logits are never held: same fp32 loss as the model's logits would give."""
  # Heads and MLP units that the mesh's tensor axis does not divide are padded inside the
  # step (zeros: the same loss and gradients) so that they split over it.
  model_cfg, params = padded_in_step(params, cfg.model, cfg.mesh.rules)
  model = model_from_params(model_cfg, params, cfg.mesh.rules)
  hidden_BxTxD = model.hidden(batch["inputs"], batch.get("positions"), batch.get("segment_ids"))
  targets_BxT = batch["targets"]
  objective, loss_sum = loss_lib.lm_head_objective(
      hidden_BxTxD, model.embed.wte[...], targets_BxT, dtype=cfg.model.dtype, rules=model.rules,
      impl=cfg.train.loss_impl, z_loss=z_loss)
  return objective, (loss_sum, jnp.sum(targets_BxT != IGNORE).astype(jnp.float32))


def loss_sums(params, cfg: Config, batch: dict[str, jax.Array]):
  """(sum of token cross-entropies, number of counted tokens), differentiable in the first."""
  loss_sum, (_, count) = objective_sums(params, cfg, batch)
  return loss_sum, count


def split_micro(batch: dict[str, jax.Array], k: int, cfg: Config) -> dict[str, jax.Array]:
  """(B, ...) -> (k, B/k, ...) where micro-batch j holds rows j, j+k, j+2k, ...

  Row i*k + j goes to micro-batch j, so each device's contiguous block of rows stays on that
  device: no data moves between devices.
  """
  def split(x):
    b = x.shape[0]
    x = x.reshape((b // k, k) + x.shape[1:])
    x = jnp.moveaxis(x, 1, 0)
    return sharding_lib.constrain(x, (None, "batch") + (None,) * (x.ndim - 2),
                                  sharding_lib.rules_table(cfg.mesh.rules))
  return jax.tree.map(split, batch)


def grads_and_sums(params, cfg: Config, batch):
  """Gradient of the summed objective, the summed objective, the summed loss and the token
  count, accumulated over `train.grad_accum` micro-batches with lax.scan. Summing (not
  averaging) per micro-batch makes k micro-batches give exactly the big batch's mean after
  the final division."""
  grad_fn = jax.value_and_grad(functools.partial(objective_sums, z_loss=cfg.train.z_loss),
                               has_aux=True)
  k = cfg.train.grad_accum
  if k == 1:
    (objective, (loss_sum, count)), grads = grad_fn(params, cfg, batch)
    return grads, objective, loss_sum, count

  def body(carry, micro):
    g_acc, o_acc, l_acc, n_acc = carry
    (objective, (loss_sum, count)), grads = grad_fn(params, cfg, micro)
    g_acc = jax.tree.map(jnp.add, g_acc, grads)
    return (g_acc, o_acc + objective, l_acc + loss_sum, n_acc + count), None

  zeros = jax.tree.map(jnp.zeros_like, params)
  (grads, objective, loss_sum, count), _ = jax.lax.scan(body, (zeros, 0.0, 0.0, 0.0),
                                                        split_micro(batch, k, cfg))
  return grads, objective, loss_sum, count


def train_step(state: dict, batch: dict[str, jax.Array], *, cfg: Config):
  """One optimizer update. Returns (new state, metrics of this step).

  A non-finite loss or gradient leaves params and optimizer state unchanged (metrics still
  report it), so the state in memory and in any checkpoint stays the last good one.
  """
  grads, objective, loss_sum, count = grads_and_sums(state["params"], cfg, batch)
  count = jnp.maximum(count, 1.0)
  grads = jax.tree.map(lambda g: g / count, grads)
  loss = loss_sum / count
  grad_norm = optax.tree.norm(grads)
  optimizer = make_optimizer(cfg.train)
  updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
  new_state = {
      "step": state["step"] + 1,
      "params": jax.tree.map(keep, params, state["params"]),
      "opt_state": jax.tree.map(keep, opt_state, state["opt_state"]),
  }
  metrics = {"loss": loss, "grad_norm": grad_norm, "tokens": count,
             "lr": make_schedule(cfg.train)(state["step"])}
  if cfg.train.z_loss:  # the z-loss term's mean per token, beside the cross-entropy
    metrics["z_loss"] = (objective - loss_sum) / count
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
  }


def _opt_state_shardings(cfg: Config, abstract_opt, param_shard: dict, mesh) -> Any:
  """Optimizer leaves that track a parameter (Adam's mu, nu) shard like it; every other leaf
  (the counters) is replicated explicitly, so none is left for the compiler to place."""
  replicated = NamedSharding(mesh, P())
  return optax.tree_utils.tree_map_params(
      make_optimizer(cfg.train), lambda _, sharding: sharding, abstract_opt, param_shard,
      transform_non_params=lambda _: replicated)


def state_shardings(cfg: Config, mesh) -> dict:
  abstract = jax.eval_shape(functools.partial(_fresh_state, cfg))
  params = param_shardings(cfg.model, mesh, cfg.mesh.rules)
  return {
      "step": NamedSharding(mesh, P()),
      "params": params,
      "opt_state": _opt_state_shardings(cfg, abstract["opt_state"], params, mesh),
  }


def abstract_state(cfg: Config, mesh) -> dict:
  """ShapeDtypeStructs with shardings of the train state (restore targets, AOT compiles)."""
  abstract = jax.eval_shape(functools.partial(_fresh_state, cfg))
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract, state_shardings(cfg, mesh))


def model_graphdef(cfg: Config):
  return nnx.split(nnx.eval_shape(
      lambda: Transformer(cfg.model, nnx.Rngs(0), cfg.mesh.rules)))[0]


def init_state(cfg: Config, mesh):
  """(graphdef, state, shardings): a fresh train state created directly in its shardings, so
  no device ever holds a full copy of the parameters."""
  shardings = state_shardings(cfg, mesh)
  with jax.set_mesh(mesh):
    state = jax.jit(functools.partial(_fresh_state, cfg), out_shardings=shardings)()
  return model_graphdef(cfg), state, shardings


def batch_shardings(cfg: Config, mesh, keys=("inputs", "targets")) -> dict:
  s = sharding_lib.batch_sharding(mesh, cfg.mesh.rules,
                                 cfg.train.batch_size // cfg.train.grad_accum)
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


# train.gpu_gemm=auto takes cuBLAS from this model width up: on an H200 cuBLAS trained every
# medium preset (d_model 1024) 1.09-1.26x faster than XLA's Triton GEMMs, while at d_model 768
# the Triton GEMMs were 1.15x faster for T6 (its per-token factor contractions) and 1.02x for
# MHA (docs/benchmarks_log.md).
CUBLAS_FROM_D_MODEL = 1024


def _on_gpu(mesh) -> bool:
  return mesh.devices.flat[0].platform in ("gpu", "cuda", "rocm")


def gpu_gemm(cfg: Config, mesh) -> str | None:
  """Who runs the train step's products on the mesh's GPUs ("cublas" or "triton", by
  train.gpu_gemm); None off GPU."""
  if not _on_gpu(mesh):
    return None
  choice = cfg.train.gpu_gemm
  if choice == "auto":
    choice = "cublas" if cfg.model.d_model >= CUBLAS_FROM_D_MODEL else "triton"
  return choice


def settled(cfg: Config, mesh) -> Config:
  """cfg with model.contract_impl=auto resolved for the train and eval steps on `mesh`: the
  Pallas contraction kernels on GPU (on an H200 they trained T6-small 1.02x and T6-medium
  1.04x faster than XLA's einsum, whose per-token products become batched GEMMs: slow
  batched cuBLAS products where train.gpu_gemm takes cuBLAS), XLA's einsum elsewhere."""
  if cfg.model.contract_impl != "auto":
    return cfg
  impl = "pallas" if _on_gpu(mesh) else "xla"
  return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, contract_impl=impl))


def compiler_options(cfg: Config, mesh) -> dict | None:
  """XLA options for the train and eval steps on the mesh's platform.

  On GPU, cuBLAS (train.gpu_gemm=cublas, or auto at d_model >= CUBLAS_FROM_D_MODEL) turns
  XLA's own Triton GEMM fusions off, so the matrix products run in cuBLAS and the casts and
  activations XLA would fuse into a Triton GEMM become separate elementwise kernels. Only the
  train and eval steps get it; decoding, CPU and TPU (AOT included) keep XLA's defaults.
  """
  if gpu_gemm(cfg, mesh) == "cublas":
    return {"xla_gpu_enable_triton_gemm": False}
  return None


def _jit_steps(cfg: Config, mesh, shardings: dict, batch_keys: tuple[str, ...]):
  replicated = NamedSharding(mesh, P())
  batch_in = batch_shardings(cfg, mesh, batch_keys)
  options = compiler_options(cfg, mesh)
  cfg = settled(cfg, mesh)
  train = jax.jit(functools.partial(train_step, cfg=cfg),
                  in_shardings=(shardings, batch_in), out_shardings=(shardings, replicated),
                  donate_argnums=0, compiler_options=options)
  evaluate = jax.jit(functools.partial(eval_step, cfg=cfg),
                     in_shardings=(shardings["params"], batch_in), out_shardings=replicated,
                     compiler_options=options)
  return train, evaluate


class TrainStep:
  """The jitted step bound to a mesh: `state, metrics = step(state, batch)`.

  In and out shardings are explicit (the state's from `state_shardings` unless given, the
  batch split over the rules' batch axes) and the state is donated. The mesh is entered
  around every call so that tracing (first call, or `lower`) sees it; the rules table travels
  with the model (cfg.mesh.rules). Compiled calls pay only the context switch.
  """

  def __init__(self, cfg: Config, mesh, shardings: dict | None = None,
               batch_keys=("inputs", "targets")):
    self.cfg, self.mesh = cfg, mesh
    if shardings is None:
      self.jitted, self.eval_jitted = _jitted_steps(cfg, mesh, tuple(batch_keys))
    else:
      self.jitted, self.eval_jitted = _jit_steps(cfg, mesh, shardings, tuple(batch_keys))

  def __call__(self, state, batch):
    with jax.set_mesh(self.mesh):
      return self.jitted(state, batch)

  def eval(self, params, batch):
    with jax.set_mesh(self.mesh):
      return self.eval_jitted(params, batch)

  def lower(self, state, batch):
    with jax.set_mesh(self.mesh):
      return self.jitted.lower(state, batch)


def tokens_per_step(cfg: Config) -> int:
  return cfg.train.batch_size * cfg.train.seq_len


def num_params(params) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(params))
