"""TPA's per-token factor contraction as Pallas (Triton) kernels, forward and backward.

Training materialises Q, K and V from their factors at every position:

  out[n, h, k] = sum_r A[n, h, r] B[n, r, k] / R          (n = a (batch, position) pair)

with R = 6 (q) or 2 (k, v) and H x d_h = 34 x 64 at T6-small: tiny per-token products whose
cost is reading A and B and writing out. Each program takes a slab of consecutive tokens and
runs them as one tensor-core product per factor pair (Q, K and V in one launch): rows i =
(token t, head h), columns j = (token t', rank r), and A enters as the block-diagonal matrix
that is zero where t != t', so

  out_slab (tokens H, d_h) = A_blockdiag (tokens H, tokens R) @ B_slab (tokens R, d_h)

and the backward reads the output gradient once and makes both factor gradients with two
more products:

  dB_slab = A_blockdiag^T @ dout_slab,   dA = the block diagonal of dout_slab @ B_slab^T

Every slab is contiguous in HBM (A, B and out are row-major over (n, ...)), so the loads and
stores are plain rows; the block diagonal is a masked load of A's slab. Tensor shapes are
padded to powers of two by masks, never in HBM, and no two lanes of a store share an address
(interpret mode scatters them).

The backward launches once per factor pair, so that each takes the tokens a program that suit
its rank (two tokens of q, three of k or v at T6-small: the block diagonal's columns stay
within one 16-wide tile, and small one-warp programs keep more loads in flight).

Measured on an H200 (bench/tpa_contract.py, one layer's q, k and v, bf16): T6-small batch 64 x
1024, forward 0.31 ms (3.2 TB/s) and backward 0.38 (2.9 TB/s) against XLA's einsum 0.44 and
0.65 (one launch of two-warp programs for all three pairs: 0.33 and 0.45). An earlier form
that ran the products on the CUDA cores (a block of tokens and a chunk of heads per program,
reductions over heads and d_h) reached the same forward speed but 1.0-1.2 TB/s backward.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jax.sharding import PartitionSpec as P

# Launch settings of the forward and the backward kernel (`bench/tpa_contract.py` sweeps
# them on the GPU): a program takes as many tokens as fit `rows` (token, head) rows of the
# output slab and, where `cols` is set, `cols` (token, rank) columns of the block diagonal;
# Triton warps and stages. The fastest of its sweep on an H200 at T6-small shapes: the
# backward, one launch per factor pair, with two tokens of q (12 columns) and three of k and
# of v (6 each) a program, 0.38 ms against 0.45 for one launch of three tokens with two warps;
# the forward 0.31 against 0.34 with two warps.
TUNING = {"fwd": {"rows": 64, "num_warps": 1, "num_stages": 1},
          "bwd": {"rows": 128, "cols": 16, "num_warps": 1, "num_stages": 1}}
# At 512 rows the H200 returned wrong factor gradients (relative error 0.9; right in interpret
# mode), so a program's slab stays at most this many rows.
MAX_ROWS = 256
# Element offsets are int32 inside the kernel.
MAX_ELEMENTS = 2**31 - 1


def _pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def contract_einsum(a_xHxR, b_xRxK):
  """The XLA form: sum_r a b / R over any leading axes, in the factors' dtype."""
  return jnp.einsum("...hr,...rk->...hk", a_xHxR, b_xRxK) / a_xHxR.shape[-1]


def slab_tokens(heads: int, rows: int, rank: int = 1, cols: int | None = None) -> int:
  """Tokens per program: as many as fit `rows` output rows and, given `cols`, `cols` columns
  of the block diagonal (`rank` a token); at least one."""
  tokens = rows // heads
  if cols:
    tokens = min(tokens, cols // rank)
  return max(1, tokens)


def _slab(n_tokens, tokens, heads, rank, head_dim):
  """Element offsets and masks of one program's slab: rows i = (t, h) of the (tokens H, d_h)
  output, columns j = (t', r) of the (tokens R, d_h) B slab, and the (tokens H, R) rows of
  dA (its rank axis padded for the tensor cores)."""
  n0 = pl.program_id(0) * tokens
  i_M = jnp.arange(max(16, _pow2(tokens * heads)), dtype=jnp.int32)  # tensor cores: >= 16
  j_C = jnp.arange(max(16, _pow2(tokens * rank)), dtype=jnp.int32)
  k_K = jnp.arange(max(16, _pow2(head_dim)), dtype=jnp.int32)
  r_R = jnp.arange(max(16, _pow2(rank)), dtype=jnp.int32)
  t_M, t_C = i_M // heads, j_C // rank
  row_ok_M = (i_M < tokens * heads) & (n0 + t_M < n_tokens)
  col_ok_C = (j_C < tokens * rank) & (n0 + t_C < n_tokens)
  k_ok_K = k_K < head_dim
  a_M = (n0 * heads + i_M) * rank  # where row (t, h) of A starts (and of dA)
  return dict(
      # A as the block-diagonal matrix: token t's (H, R) block at rows t H, columns t R
      # (a valid row's own columns are valid too).
      diag_MxC=row_ok_M[:, None] & (t_M[:, None] == t_C[None, :]),
      a_MxC=a_M[:, None] + (j_C - t_C * rank)[None, :],
      # Column j of the block diagonal holds rank j mod R.
      pick_CxR=(j_C[:, None] % rank) == r_R[None, :],
      da_ok_MxR=row_ok_M[:, None] & (r_R < rank)[None, :],
      da_MxR=a_M[:, None] + r_R[None, :],
      b_ok_CxK=col_ok_C[:, None] & k_ok_K[None, :],
      b_CxK=n0 * rank * head_dim + j_C[:, None] * head_dim + k_K[None, :],
      out_ok_MxK=row_ok_M[:, None] & k_ok_K[None, :],
      out_MxK=n0 * heads * head_dim + i_M[:, None] * head_dim + k_K[None, :])


def _precision(dtype):
  # fp32 factors multiply exactly (Triton's default for fp32 operands is TF32).
  return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _dot(a, b, contract_a: int, contract_b: int):
  return jax.lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())),
                             precision=_precision(a.dtype), preferred_element_type=jnp.float32)


def _fwd_kernel(*refs, ranks, heads, head_dim, n_tokens, tokens):
  groups = len(ranks)
  for g, rank in enumerate(ranks):
    a_ref, b_ref, out_ref = refs[2 * g], refs[2 * g + 1], refs[2 * groups + g]
    s = _slab(n_tokens, tokens, heads, rank, head_dim)
    a_MxC = plgpu.load(a_ref.at[s["a_MxC"]], mask=s["diag_MxC"], other=0.0)
    b_CxK = plgpu.load(b_ref.at[s["b_CxK"]], mask=s["b_ok_CxK"], other=0.0)
    out_MxK = _dot(a_MxC, b_CxK, 1, 0) * (1.0 / rank)
    plgpu.store(out_ref.at[s["out_MxK"]], out_MxK.astype(out_ref.dtype), mask=s["out_ok_MxK"])


def _bwd_kernel(*refs, ranks, heads, head_dim, n_tokens, tokens):
  groups = len(ranks)
  for g, rank in enumerate(ranks):
    a_ref, b_ref, dout_ref = refs[3 * g], refs[3 * g + 1], refs[3 * g + 2]
    da_ref, db_ref = refs[3 * groups + 2 * g], refs[3 * groups + 2 * g + 1]
    s = _slab(n_tokens, tokens, heads, rank, head_dim)
    dout_MxK = plgpu.load(dout_ref.at[s["out_MxK"]], mask=s["out_ok_MxK"], other=0.0)
    a_MxC = plgpu.load(a_ref.at[s["a_MxC"]], mask=s["diag_MxC"], other=0.0)
    b_CxK = plgpu.load(b_ref.at[s["b_CxK"]], mask=s["b_ok_CxK"], other=0.0)
    db_CxK = _dot(a_MxC, dout_MxK, 0, 0) * (1.0 / rank)
    plgpu.store(db_ref.at[s["b_CxK"]], db_CxK.astype(db_ref.dtype), mask=s["b_ok_CxK"])
    # dA: keep each row's own token's block of dout B^T (scaled and rounded once), then sum
    # the columns of rank r into column r with a 0/1 product: one non-zero term each, so
    # exact, and every (token, h, r) is stored by one lane.
    full_MxC = _dot(dout_MxK, b_CxK, 1, 1) * (1.0 / rank)
    own_MxC = jnp.where(s["diag_MxC"], full_MxC, 0.0).astype(a_MxC.dtype)
    da_MxR = _dot(own_MxC, s["pick_CxR"].astype(a_MxC.dtype), 1, 0)
    plgpu.store(da_ref.at[s["da_MxR"]], da_MxR.astype(da_ref.dtype), mask=s["da_ok_MxR"])


def _launch(kernel, name, inputs, out_shapes, *, ranks, heads, head_dim, tune, interpret):
  n_tokens = inputs[0].shape[0]
  rows = tune["rows"]
  if not 1 <= rows <= MAX_ROWS:
    raise ValueError(f"tpa_contract rows={rows}: use 1..{MAX_ROWS} (output rows a program)")
  tokens = slab_tokens(heads, rows, max(ranks), tune.get("cols"))
  body = functools.partial(kernel, ranks=ranks, heads=heads, head_dim=head_dim,
                           n_tokens=n_tokens, tokens=tokens)
  # Flat operands: the kernel computes every slab's element offsets itself.
  inputs = [x.reshape(-1) for x in inputs]
  flat_shapes = [jax.ShapeDtypeStruct((s.size,), s.dtype) for s in out_shapes]
  whole = lambda shape: pl.BlockSpec(shape, lambda i: (0,) * len(shape))
  extra = {}
  if not interpret:
    extra["compiler_params"] = plgpu.CompilerParams(num_warps=tune["num_warps"],
                                                    num_stages=tune["num_stages"])
  outs = pl.pallas_call(
      body,
      grid=(pl.cdiv(n_tokens, tokens),),
      in_specs=[whole(x.shape) for x in inputs],
      out_specs=[whole(s.shape) for s in flat_shapes],
      out_shape=flat_shapes,
      interpret=interpret,
      name=name,
      **extra,
  )(*inputs)
  return [o.reshape(s.shape) for o, s in zip(outs, out_shapes)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _contract(config, *factors):
  return _contract_fwd(config, *factors)[0]


def _contract_fwd(config, *factors):
  heads, head_dim, (tune, _), interpret = config
  pairs = list(zip(factors[0::2], factors[1::2]))
  ranks = tuple(a.shape[-1] for a, _ in pairs)
  outs = _launch(_fwd_kernel, "tpa_contract", factors,
                 [jax.ShapeDtypeStruct((a.shape[0], heads, head_dim), a.dtype)
                  for a, _ in pairs],
                 ranks=ranks, heads=heads, head_dim=head_dim, tune=dict(tune),
                 interpret=interpret)
  return tuple(outs), factors


def _contract_bwd(config, factors, douts):
  heads, head_dim, (_, tune), interpret = config
  pairs = list(zip(factors[0::2], factors[1::2]))
  ranks = tuple(a.shape[-1] for a, _ in pairs)
  grads = []
  # One launch per pair: each takes the tokens a program that suit its rank (one launch for
  # all three was 0.45 ms against 0.38 at T6-small).
  for (a, b), dout, rank in zip(pairs, douts, ranks):
    shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (a, b)]
    grads += _launch(_bwd_kernel, "tpa_contract_bwd", [a, b, dout.astype(a.dtype)], shapes,
                     ranks=(rank,), heads=heads, head_dim=head_dim, tune=dict(tune),
                     interpret=interpret)
  return tuple(grads)


_contract.defvjp(_contract_fwd, _contract_bwd)


def tpa_contract(pairs, *, interpret: bool = False, fwd: dict | None = None,
                 bwd: dict | None = None):
  """[(A (..., H, R_i), B (..., R_i, d_h)), ...] -> (sum_r A B / R_i of shape (..., H, d_h),
  ...) in one kernel launch (and one for the backward), differentiable.

  Every pair has the same leading axes, heads and d_h and one float dtype (the output's); the
  ranks may differ. fwd / bwd: launch settings of either kernel over the module's TUNING.
  """
  a0, b0 = pairs[0]
  lead, heads, head_dim = a0.shape[:-2], a0.shape[-2], b0.shape[-1]
  for a, b in pairs:
    if (a.shape[:-1] != lead + (heads,) or b.shape != lead + (a.shape[-1], head_dim)
        or a.dtype != a0.dtype or b.dtype != a0.dtype):
      raise ValueError(f"tpa_contract takes factor pairs (..., {heads}, R) x (..., R, "
                       f"{head_dim}) with leading axes {lead} and one dtype; got "
                       f"{a.shape} {a.dtype} x {b.shape} {b.dtype}")
  n_tokens = math.prod(lead)
  tune = tuple(tuple(sorted({**TUNING[k], **(given or {})}.items()))
               for k, given in (("fwd", fwd), ("bwd", bwd)))
  config = (heads, head_dim, tune, interpret)
  flat = []
  for a, b in pairs:  # free reshapes: one row of H*R (or R*d_h) numbers per token
    flat += [a.reshape(n_tokens, heads, a.shape[-1]), b.reshape(n_tokens, b.shape[-2], head_dim)]
  outs = _contract(config, *flat)
  return tuple(o.reshape(lead + (heads, head_dim)) for o in outs)


def tpa_contract_sharded(pairs, *, mesh, batch_axes: tuple[str, ...], interpret: bool = False):
  """`tpa_contract` under `jax.shard_map`: every factor and output split by batch over
  `batch_axes` (which must divide it), heads, ranks and d_h whole on every device; the
  per-token products need nothing from other rows."""
  flat = [x for pair in pairs for x in pair]
  specs = tuple(P(tuple(batch_axes), *([None] * (x.ndim - 1))) for x in flat)
  local = lambda *flat: tpa_contract(list(zip(flat[0::2], flat[1::2])), interpret=interpret)
  # jit: eager callers get their arguments resharded to the specs (inside a jit it is a no-op).
  return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=specs[0::2],
                               check_vma=False))(*flat)
