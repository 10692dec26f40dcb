"""One row times a weight matrix as a Pallas (Triton) kernel: the products of a batch-1 decode step.

  y[n] = sum_k x[k] W[k, n]      (W stored (K, N): "kn", the projections)
  y[n] = sum_k x[k] W[n, k]      (W stored (N, K): "nk", the tied LM head)

XLA's GPU compiler turns a product with a one-row operand into an elementwise multiply and a
reduction, and on an H200 it writes the multiply out as a weight-sized temporary before
reducing it, so a batch-1 decode step moves every weight matrix through HBM about three times.
This kernel reads each weight once, in 2-D tiles that Triton pipelines, and reduces in
registers in fp32: it is bound by the weight read alone.

Grid (column tiles, K splits): program (j, s) reduces columns [j BN, (j+1) BN) over its share of
K and writes an fp32 partial sum; the splits (enough programs to fill the GPU, about `per_sm`
per SM) are summed by XLA, which fuses that sum into the consumer, or by the consumer itself
(a prologue of the next GEMV kernel, `tpa_step`). With a residual stream the kernel ends a
sublayer itself: each column tile's last program to finish (an atomic ticket) sums the tile's
splits in split order and adds them to the residual (measured on an H200: t6-small batch-1
step 0.418 -> 0.369 ms, t6-xl 2.527 -> 2.397, the two XLA kernels of each add gone).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from t6_jax.kernels.tpa_decode_gpu import NEG, _pow2, num_sms

# Per layout: columns (outputs) per program, K per loop step, warps, pipeline stages, programs
# per SM. Swept on an H200 over T6-XL's matrices (bench/gemv.py --sweep): (N, K) storage
# reads K-contiguous rows and wants longer K steps than (K, N), whose tiles are N-contiguous.
# (K, N) with two warps rather than four: whole t6-xl batch-1 steps 2.163-2.197 ms against
# 2.203-2.236 (bench/decode.py --gemv kn.num_warps=2, alternated in one call); 1 warp, or 8
# programs per SM, was slower (2.49-2.79). norm_once: the pre-norm's sum of squares from one
# load of all of x instead of a loop of block_k loads (x is d_model long, 1,600 at T6-XL):
# batch-1 2k steps on an H100 (2026-12-05, one call) t6-small 0.339 / 0.347 ms against 0.347
# / 0.352, t6-xl 2.318 against 2.337; 0 keeps the loop.
TUNING = {"kn": {"block_n": 128, "block_k": 64, "num_warps": 2, "num_stages": 3, "per_sm": 4,
                 "norm_once": 1},
          "nk": {"block_n": 64, "block_k": 128, "num_warps": 8, "num_stages": 3, "per_sm": 4,
                 "norm_once": 1}}


def _kernel(*refs, **kw):
  _program(pl.program_id(0), pl.program_id(1), *refs, **kw)


def _program(j, split, *refs, layout, k_len, n_len, block_n, block_k, steps_per_split,
             prologue, x_splits, splits, residual, zeros, norm_once, interpret,
             x_volatile=False):
  """Program (column tile j, K split `split`) of the kernel. x_volatile: x's partials are read
  with volatile loads, past L1 (written earlier in the same kernel by other programs:
  `bench/persistent_mlp.py`)."""
  kind = None if prologue is None else prologue[0]
  # inputs: x (or acc, m, l), w [, r, tickets]; outputs: partials [, new r, tickets
  # (aliased)] [, zeros]
  n_in = (4 if kind == "combine" else 2) + (2 if residual else 0)
  ins, (out_ref, *outs) = refs[:n_in], refs[n_in:]
  if kind == "combine":
    x_ref, m_ref, l_ref, w_ref = ins[:4]
  else:
    x_ref, w_ref = ins[:2]
  if residual:
    r_ref, (r_out_ref, ticket_ref) = ins[-2], outs[:2]
  if zeros:  # the next GEMV kernel's tickets (its residual epilogue), without a memset
    pl.when((j == 0) & (split == 0))(lambda: plgpu.store(
        outs[-1].at[jnp.arange(_pow2(zeros), dtype=jnp.int32)],
        jnp.zeros((_pow2(zeros),), jnp.int32),
        mask=jnp.arange(_pow2(zeros), dtype=jnp.int32) < zeros))
  n_N = j * block_n + jnp.arange(block_n, dtype=jnp.int32)
  k_first = split * steps_per_split * block_k
  f32 = jnp.float32
  rnd = lambda v: v.astype(w_ref.dtype).astype(f32)  # a value in the weights' dtype

  def summed(idx_K, ok_K):  # x_ref (x_splits, width): sum of the producer's K-split partials
    total = plgpu.load(x_ref.at[0, idx_K], mask=ok_K, other=0.0,
                       volatile=x_volatile).astype(f32)
    for s in range(1, x_splits):
      total += plgpu.load(x_ref.at[s, idx_K], mask=ok_K, other=0.0,
                          volatile=x_volatile).astype(f32)
    return total

  if kind == "rms_norm" and norm_once:  # the norm of all of x in one load
    k_X = jnp.arange(_pow2(k_len), dtype=jnp.int32)
    x_X = plgpu.load(x_ref.at[k_X], mask=k_X < k_len, other=0.0).astype(f32)
    inv = jax.lax.rsqrt(jnp.sum(x_X * x_X) / k_len + prologue[1])
  elif kind == "rms_norm":  # the norm of all of x, per program
    def square_sum(t, acc_K):
      k_K = t * block_k + jnp.arange(block_k, dtype=jnp.int32)
      x_K = plgpu.load(x_ref.at[k_K], mask=k_K < k_len, other=0.0).astype(f32)
      return acc_K + x_K * x_K
    sq_K = jax.lax.fori_loop(0, pl.cdiv(k_len, block_k), square_sum,
                             jnp.zeros((block_k,), f32))
    inv = jax.lax.rsqrt(jnp.sum(sq_K) / k_len + prologue[1])

  def merged(k_K, ok_K):
    """The attention output at flat index h d_h + d, merged from the decode kernel's splits
    (m, l (S, rows), acc (S, rows, kp)) as `tpa_decode_gpu.combine` merges them."""
    _, heads, head_dim, v_rank = prologue
    s_S = jnp.arange(_pow2(x_splits), dtype=jnp.int32)[:, None]
    h_1xK, d_1xK = (k_K // head_dim)[None, :], (k_K % head_dim)[None, :]
    ok_SxK = (s_S < x_splits) & ok_K[None, :]
    m_SxK = plgpu.load(m_ref.at[s_S, h_1xK], mask=ok_SxK, other=NEG)
    l_SxK = plgpu.load(l_ref.at[s_S, h_1xK], mask=ok_SxK, other=0.0)
    acc_SxK = plgpu.load(x_ref.at[s_S, h_1xK, d_1xK], mask=ok_SxK, other=0.0)
    w_SxK = jnp.exp2(m_SxK - jnp.max(m_SxK, axis=0)[None, :])
    l_K = jnp.sum(w_SxK * l_SxK, axis=0)
    return jnp.sum(w_SxK * acc_SxK, axis=0) / (jnp.maximum(l_K, 1e-30) * v_rank)

  def x_at(k_K):
    ok_K = k_K < k_len
    if prologue is None:
      return plgpu.load(x_ref.at[k_K], mask=ok_K, other=0.0).astype(f32)
    if kind == "combine":  # in the compute dtype, as the combine kernel writes it
      return rnd(merged(k_K, ok_K))
    if kind == "rms_norm":
      x_K = plgpu.load(x_ref.at[k_K], mask=ok_K, other=0.0).astype(f32)
      return rnd(x_K * inv)
    # swiglu: silu(gate) * up from the packed (gate | up) product, each op rounded to the
    # compute dtype as XLA rounds jax.nn.silu(gate) * up.
    gate_K, up_K = rnd(summed(k_K, ok_K)), rnd(summed(k_K + k_len, ok_K))
    sig_K = rnd(1.0 / (1.0 + jnp.exp(-gate_K)))
    return rnd(rnd(gate_K * sig_K) * up_K)

  def body(t, acc_N):
    k_K = k_first + t * block_k + jnp.arange(block_k, dtype=jnp.int32)
    x_K = x_at(k_K)
    if layout == "kn":
      ok = (k_K[:, None] < k_len) & (n_N[None, :] < n_len)
      w_KxN = plgpu.load(w_ref.at[k_K[:, None], n_N[None, :]], mask=ok, other=0.0)
      return acc_N + jnp.sum(x_K[:, None] * w_KxN.astype(f32), axis=0)
    ok = (n_N[:, None] < n_len) & (k_K[None, :] < k_len)
    w_NxK = plgpu.load(w_ref.at[n_N[:, None], k_K[None, :]], mask=ok, other=0.0)
    return acc_N + jnp.sum(w_NxK.astype(f32) * x_K[None, :], axis=1)

  steps = jnp.clip(pl.cdiv(k_len - k_first, block_k), 0, steps_per_split)
  acc_N = jax.lax.fori_loop(0, steps, body, jnp.zeros((block_n,), f32))
  ok_N = n_N < n_len
  plgpu.store(out_ref.at[split, n_N], acc_N, mask=ok_N)
  if not residual:
    return
  # The residual epilogue: the last program of a column tile to finish (a ticket from an
  # atomic counter; the barrier puts every thread's partial store before it) sums the
  # tile's partials in split order, so the result does not depend on which program was last,
  # and adds them (rounded to the weights' dtype, as the product's value) to the residual.
  if not interpret:  # (the interpreter runs programs one after another)
    plgpu.debug_barrier()
  ticket = plgpu.atomic_add(ticket_ref, (j,), jnp.int32(1))

  @pl.when(ticket == splits - 1)
  def _():
    def add(s, total_N):  # volatile: the other programs' partials, from L2
      return total_N + plgpu.load(out_ref.at[s, n_N], mask=ok_N, other=0.0, volatile=True)
    total_N = jax.lax.fori_loop(0, splits, add, jnp.zeros((block_n,), f32))
    r_N = plgpu.load(r_ref.at[n_N], mask=ok_N, other=0.0).astype(f32)
    plgpu.store(r_out_ref.at[n_N], (r_N + rnd(total_N)).astype(r_out_ref.dtype), mask=ok_N)


def gemv(x_K, w, *, layout: str = "kn", block_n: int | None = None,
         block_k: int | None = None, num_warps: int | None = None,
         num_stages: int | None = None, per_sm: int | None = None, norm_once: int | None = None,
         splits: int | None = None,
         reduce: bool = True, prologue: tuple | None = None, residual: jax.Array | None = None,
         tickets: jax.Array | None = None, zeros: int = 0, interpret: bool = False):
  """fp32 (N,) = x_K (K,) times w: (K, N) with layout "kn", (N, K) with "nk"; 16-bit or fp32
  operands. Settings default to TUNING[layout]; splits (default: from per_sm and the GPU's SMs)
  overrides the number of K splits. reduce=False returns the splits' partial sums (splits, N)
  for a consumer that sums them itself.

  prologue: what the kernel computes x from, in the weights' dtype, so that XLA runs no
  kernel for it:
    ("rms_norm", eps): x_K is the residual r; x = r / sqrt(mean(r^2) + eps) (a block's
      parameter-free pre-norm, in fp32; each program reduces all of r, a few KB);
    ("swiglu",): x_K is (S, 2K), S partial sums of the packed (gate | up) product (S = 1:
      the product itself); x = silu(gate) * up (the MLP's hidden activation);
    ("combine", heads, head_dim, v_rank): x_K is the TPA decode kernel's unmerged splits of
      one row, (acc (S, rows, kp), m (S, rows), l (S, rows)) (`tpa_decode_gpu.tpa_decode_rows`
      with merge=False), K = heads * head_dim; x = the attention output they merge to, as
      `tpa_decode_gpu.combine` merges them (each program merges its own K range: one head
      per 64 columns at d_h 64).

  residual: an (N,) residual stream r (fp32 or the compute dtype): returns r + y, y the
  product rounded to the weights' dtype, r's dtype, with the K splits summed and added to r
  inside the kernel (by each column tile's last program, in split order) instead of by two
  XLA kernels after it (reduce is then ignored). tickets: the epilogue's counters, at least
  `ticket_slots(N)` int32 zeros (default: zeros XLA writes before the kernel); zeros=n: also
  return (result, n int32 zeros written by the kernel), the tickets of a later GEMV kernel.
  """
  if layout not in ("kn", "nk"):
    raise ValueError(f"layout={layout!r}; use 'kn' (w is (K, N)) or 'nk' (w is (N, K))")
  k_len, n_len = w.shape if layout == "kn" else w.shape[::-1]
  kind = None if prologue is None else prologue[0]
  if kind not in (None, "rms_norm", "swiglu", "combine"):
    raise ValueError(f"prologue={prologue!r}; use None, ('rms_norm', eps), ('swiglu',) or "
                     f"('combine', heads, head_dim, v_rank)")
  if kind == "combine":
    acc, m, l = x_K
    _, heads, head_dim, _ = prologue
    ok = (acc.ndim == 3 and m.shape == l.shape == acc.shape[:2] and acc.shape[1] >= heads
          and acc.shape[2] >= head_dim and heads * head_dim == k_len)
    operands, x_splits = (acc, m, l, w), acc.shape[0]
  else:
    ok = (x_K.ndim == 2 and x_K.shape[1] == 2 * k_len) if kind == "swiglu" else (
        x_K.shape == (k_len,))
    operands, x_splits = (x_K, w), x_K.shape[0] if kind == "swiglu" else 1
  if not ok:
    shapes = [x.shape for x in operands[:-1]]
    raise ValueError(f"x {shapes} does not match w {w.shape} ({layout}, {prologue})")
  if residual is not None and residual.shape != (n_len,):
    raise ValueError(f"residual {residual.shape} does not match the product's ({n_len},)")
  tune = settings(layout, k_len, n_len, block_n=block_n, block_k=block_k,
                  num_warps=num_warps, num_stages=num_stages, per_sm=per_sm,
                  norm_once=norm_once, splits=splits)
  n_tiles, splits = tune["n_tiles"], tune["splits"]
  extra = {}
  if not interpret:
    extra["compiler_params"] = plgpu.CompilerParams(num_warps=tune["num_warps"],
                                                    num_stages=tune["num_stages"])
  whole = lambda shape: pl.BlockSpec(shape, lambda j, s: (0,) * len(shape))
  out_shape = [jax.ShapeDtypeStruct((splits, n_len), jnp.float32)]
  if residual is not None:  # + the new residual, and the tiles' tickets (zeros in, aliased)
    if tickets is None:
      tickets = jnp.zeros((n_tiles,), jnp.int32)
    if tickets.dtype != jnp.int32 or tickets.ndim != 1 or tickets.shape[0] < n_tiles:
      raise ValueError(f"tickets {tickets.shape} {tickets.dtype}: need >= {n_tiles} int32")
    operands += (residual, tickets)
    out_shape += [jax.ShapeDtypeStruct((n_len,), residual.dtype),
                  jax.ShapeDtypeStruct(tickets.shape, jnp.int32)]
    extra["input_output_aliases"] = {len(operands) - 1: 2}
  if zeros:
    out_shape.append(jax.ShapeDtypeStruct((zeros,), jnp.int32))
  outs = pl.pallas_call(
      functools.partial(_kernel, **program_kwargs(
          tune, layout, k_len, n_len, prologue=prologue, x_splits=x_splits,
          residual=residual is not None, zeros=zeros, interpret=interpret)),
      grid=(n_tiles, splits),
      in_specs=[whole(x.shape) for x in operands],
      out_specs=[whole(o.shape) for o in out_shape],
      out_shape=out_shape,
      interpret=interpret,
      name="gemv",
      **extra,
  )(*operands)
  if residual is not None:
    result = outs[1]
  else:
    result = jnp.sum(outs[0], axis=0) if reduce else outs[0]
  return (result, outs[-1]) if zeros else result


def settings(layout: str, k_len: int, n_len: int, *, splits: int | None = None,
             **overrides) -> dict:
  """The launch of a (k_len -> n_len) product: TUNING[layout] with the overrides that are
  not None, block sizes fitted to the matrix, and the grid: n_tiles column tiles times
  `splits` K splits of steps_per_split block_k steps each."""
  tune = dict(TUNING[layout], **{k: v for k, v in overrides.items() if v is not None})
  block_n = min(_pow2(tune["block_n"]), max(16, _pow2(n_len)))
  block_k = min(_pow2(tune["block_k"]), max(16, _pow2(k_len)))
  n_tiles, k_steps = pl.cdiv(n_len, block_n), pl.cdiv(k_len, block_k)
  if splits is None:
    splits = max(1, min(k_steps, tune["per_sm"] * num_sms() // n_tiles))
  steps_per_split = pl.cdiv(k_steps, max(1, min(splits, k_steps)))
  return dict(tune, block_n=block_n, block_k=block_k, n_tiles=n_tiles,
              splits=pl.cdiv(k_steps, steps_per_split), steps_per_split=steps_per_split)


def program_kwargs(tune: dict, layout: str, k_len: int, n_len: int, *, prologue, x_splits: int,
                   residual: bool, zeros: int, interpret: bool, x_volatile: bool = False) -> dict:
  """`_program`'s keyword arguments for a product launched with `settings` `tune`."""
  return dict(layout=layout, k_len=k_len, n_len=n_len, block_n=tune["block_n"],
              block_k=tune["block_k"], steps_per_split=tune["steps_per_split"],
              prologue=prologue, x_splits=x_splits, splits=tune["splits"], residual=residual,
              zeros=zeros, norm_once=bool(tune["norm_once"]), interpret=interpret,
              x_volatile=x_volatile)


def ticket_slots(n_len: int) -> int:
  """Tickets enough for the residual epilogue of any product with n_len outputs (one per
  column tile, tiles at least 16 wide)."""
  return max(1, pl.cdiv(n_len, 16))
