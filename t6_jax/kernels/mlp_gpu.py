"""A batch-1 decode step's MLP sublayer as one persistent Pallas (Triton) kernel.

  r' = r + c_proj(silu(gate) * up),  (gate | up) = rms_norm(r) W_in    (one row, on one GPU)

The step otherwise runs this as two GEMV kernels (`gemv_gpu.gemv`): the packed (gate | up)
product with the pre-norm in its prologue, written as fp32 K-split partial sums, then the
output projection, which forms silu(gate) * up from those partials and adds its product to
the residual stream in its epilogue. Here one kernel launches `programs` programs, all
resident at once (at most a few per SM); each runs its share of the first product's programs
(the same `gemv_gpu._program` code and launch settings), the programs meet at a grid-wide
barrier (an atomic counter, acquire-release at GPU scope, spun on), and then run the second
product's programs, reading the first's partials past L1. One kernel boundary (launch, ramp,
tail) becomes one barrier; the values are the two kernels' bit for bit.

TUNING["per_sm"] = 0 (the default) keeps the two kernels; bench/persistent_mlp.py times both
forms and bench/decode.py --persistent_mlp per_sm=N runs whole steps with this one. In
interpret mode the kernel runs one program (the interpreter runs programs one after another,
so a barrier between several could never open).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from t6_jax.kernels import gemv_gpu
from t6_jax.kernels.tpa_decode_gpu import num_sms

# Programs per SM (0: the two GEMV kernels instead) and warps per program.
TUNING = {"per_sm": 0, "num_warps": 4}


def _stage(program, programs, tune, refs, kw):
  """This program's share of one product's (column tile, K split) programs."""
  total = tune["n_tiles"] * tune["splits"]

  def body(i, carry):
    v = program + i * programs
    pl.when(v < total)(lambda: gemv_gpu._program(v // tune["splits"], v % tune["splits"],
                                                 *refs, **kw))
    return carry

  lax.fori_loop(0, pl.cdiv(total, programs), body, jnp.int32(0))


def _kernel(r_ref, w1_ref, w2_ref, tickets_in, counter_in, part1_ref, part2_ref, r_out_ref,
            ticket_ref, counter_ref, *, programs, t1, t2, kw1, kw2, interpret):
  del tickets_in, counter_in  # aliased to ticket_ref, counter_ref (zeros in)
  program = pl.program_id(0)
  _stage(program, programs, t1, (r_ref, w1_ref, part1_ref), kw1)
  # The barrier: every thread's partial stores before this program's arrival (CTA barrier,
  # then the acquire-release atomic), then spin until every program has arrived.
  if not interpret:  # (one program there: nothing to wait for, and no spin loop interprets)
    plgpu.debug_barrier()
    arrived = plgpu.atomic_add(counter_ref, (0,), jnp.int32(1)) + 1
    lax.while_loop(lambda n: n < programs,
                   lambda n: plgpu.atomic_add(counter_ref, (0,), jnp.int32(0)), arrived)
    plgpu.debug_barrier()
  _stage(program, programs, t2,
         (part1_ref, w2_ref, r_ref, ticket_ref, part2_ref, r_out_ref, ticket_ref), kw2)


def _program_kw(tune, layout, k_len, n_len, prologue, x_splits, residual, interpret,
                x_cached=True):
  return dict(layout=layout, k_len=k_len, n_len=n_len, block_n=tune["block_n"],
              block_k=tune["block_k"], steps_per_split=tune["steps_per_split"],
              prologue=prologue, x_splits=x_splits, splits=tune["splits"], residual=residual,
              zeros=0, norm_once=bool(tune["norm_once"]), interpret=interpret,
              x_cached=x_cached)


def persistent_mlp(r_D, w_in_NxD, w_out_FxD, *, eps: float, per_sm: int | None = None,
                   num_warps: int | None = None, interpret: bool = False):
  """r_D + the MLP sublayer of r_D (D,) in r_D's dtype: w_in_NxD the packed (gate | up)
  projection stored output-major (2F, D), w_out_FxD the output projection (F, D), both in
  the compute dtype; the pre-norm's eps. per_sm / num_warps default to TUNING (per_sm at
  least 1 here)."""
  d, n2, f = r_D.shape[0], w_in_NxD.shape[0], w_out_FxD.shape[0]
  if r_D.ndim != 1 or w_in_NxD.shape != (2 * f, d) or w_out_FxD.shape != (f, d):
    raise ValueError(f"persistent_mlp: r {r_D.shape}, w_in {w_in_NxD.shape}, w_out "
                     f"{w_out_FxD.shape}: need (D,), (2F, D), (F, D)")
  per_sm = max(1, TUNING["per_sm"] if per_sm is None else per_sm)
  num_warps = TUNING["num_warps"] if num_warps is None else num_warps
  programs = 1 if interpret else per_sm * num_sms()
  t1 = gemv_gpu.settings("nk", d, n2)
  t2 = gemv_gpu.settings("kn", f, d)
  kw1 = _program_kw(t1, "nk", d, n2, ("rms_norm", eps), 1, False, interpret)
  kw2 = _program_kw(t2, "kn", f, d, ("swiglu",), t1["splits"], True, interpret,
                    x_cached=False)
  tickets = jnp.zeros((gemv_gpu.ticket_slots(d),), jnp.int32)
  counter = jnp.zeros((1,), jnp.int32)
  operands = (r_D, w_in_NxD, w_out_FxD, tickets, counter)
  out_shape = [jax.ShapeDtypeStruct((t1["splits"], n2), jnp.float32),
               jax.ShapeDtypeStruct((t2["splits"], d), jnp.float32),
               jax.ShapeDtypeStruct((d,), r_D.dtype),
               jax.ShapeDtypeStruct(tickets.shape, jnp.int32),
               jax.ShapeDtypeStruct(counter.shape, jnp.int32)]
  whole = lambda shape: pl.BlockSpec(shape, lambda p: (0,) * len(shape))
  extra = {} if interpret else {"compiler_params": plgpu.CompilerParams(
      num_warps=num_warps, num_stages=max(t1["num_stages"], t2["num_stages"]))}
  outs = pl.pallas_call(
      functools.partial(_kernel, programs=programs, t1=t1, t2=t2, kw1=kw1, kw2=kw2,
                        interpret=interpret),
      grid=(programs,),
      in_specs=[whole(x.shape) for x in operands],
      out_specs=[whole(s.shape) for s in out_shape],
      out_shape=out_shape,
      input_output_aliases={3: 3, 4: 4},
      interpret=interpret,
      name="persistent_mlp",
      **extra,
  )(*operands)
  return outs[2]


def two_kernels(r_D, w_in_NxD, w_out_FxD, *, eps: float, interpret: bool = False):
  """The same sublayer as the step runs it otherwise: two GEMV kernels."""
  d = r_D.shape[0]
  parts, tickets = gemv_gpu.gemv(r_D, w_in_NxD, layout="nk", reduce=False,
                                 prologue=("rms_norm", eps), zeros=gemv_gpu.ticket_slots(d),
                                 interpret=interpret)
  return gemv_gpu.gemv(parts, w_out_FxD, layout="kn", prologue=("swiglu",), residual=r_D,
                       tickets=tickets, interpret=interpret)
