"""TPA's per-token factor contraction as Pallas (Triton) kernels, forward and backward.

Training materialises Q, K and V from their factors at every position:

  out[n, h, k] = sum_r A[n, h, r] B[n, r, k] / R          (n = a (batch, position) pair)

with R = 6 (q) or 2 (k, v) and H x d_h = 34 x 64 at T6-small: tiny per-token products whose
cost is reading A and B and writing out. Each program takes a block of tokens and every head,
rank and d_h column of one or several factor pairs (Q, K and V in one launch), accumulating in
fp32 on the CUDA cores and writing the compute dtype. The backward kernel reads the output
gradient once and writes both factor gradients:

  dA[n, h, r] = sum_k dout[n, h, k] B[n, r, k] / R
  dB[n, r, k] = sum_h dout[n, h, k] A[n, h, r] / R

Triton wants power-of-two tensors: heads go in chunks of power-of-two sizes (34 = 32 + 2,
47 = 32 + 16 with one masked row) and d_h is padded to a power of two by masking, so nothing is
padded in HBM. Out-of-range lanes are masked on every load and store, never clamped, so no two
lanes of a store share an address (interpret mode scatters them).

Measured on an H200 (T6-small, batch 64 x 1024, one layer's q, k and v; bench/tpa_contract.py):
the forward kernel takes 0.32 ms (3.1 TB/s) against XLA's 0.43 ms (2.3 TB/s), but the backward
kernel 0.91-1.11 ms (1.0-1.2 TB/s) against XLA's Triton GEMM fusions' 0.65 ms (1.7 TB/s): with
XLA's Triton GEMMs whole training steps are slower (0.98x at T6-small, 0.83x at T6-medium).
Where the train step's products run in cuBLAS (train.gpu_gemm), XLA's contraction becomes slow
batched cuBLAS products and the kernels win (T6-medium 1.13x, T6-XL 1.08x): model.contract_impl
=auto takes them there. The backward is where the kernel loses (its head and d_h reductions):
with head chunks of 16 and 8-16 tokens per program it took 8 ms, and T6-medium's 47 heads run
a chunk of 16.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jax.sharding import PartitionSpec as P

# Launch settings of the forward and the backward kernel (`bench/tpa_contract.py` sweeps
# them on the GPU): tokens per program, largest head chunk, Triton warps and stages. The
# fastest of its sweep on an H200 at T6-small shapes.
TUNING = {"fwd": {"block_t": 4, "head_block": 32, "num_warps": 4, "num_stages": 1},
          "bwd": {"block_t": 1, "head_block": 32, "num_warps": 2, "num_stages": 1}}
# Element offsets are int32 inside the kernel.
MAX_ELEMENTS = 2**31 - 1


def _pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def head_chunks(heads: int, head_block: int) -> list[tuple[int, int]]:
  """(first head, power-of-two size) chunks covering `heads`, at most `head_block` each; the
  last chunk is padded (masked) only where that wastes at most a quarter of it."""
  chunks, h0 = [], 0
  while h0 < heads:
    rest = heads - h0
    size = min(_pow2(head_block), _pow2(rest))
    if size > rest and size - rest > size // 4:
      size //= 2
    chunks.append((h0, size))
    h0 += size
  return chunks


def contract_einsum(a_xHxR, b_xRxK):
  """The XLA form: sum_r a b / R over any leading axes, in the factors' dtype."""
  return jnp.einsum("...hr,...rk->...hk", a_xHxR, b_xRxK) / a_xHxR.shape[-1]


def _token_axes(n_tokens, block_t, head_dim):
  n0 = pl.program_id(0) * block_t
  n_T = n0 + jnp.arange(block_t, dtype=jnp.int32)
  k_K = jnp.arange(_pow2(head_dim), dtype=jnp.int32)
  return n_T, n_T < n_tokens, k_K, k_K < head_dim


def _fwd_kernel(*refs, ranks, heads, head_dim, n_tokens, block_t, chunks):
  groups = len(ranks)
  n_T, n_ok_T, k_K, k_ok_K = _token_axes(n_tokens, block_t, head_dim)
  nk_ok_TxK = n_ok_T[:, None] & k_ok_K[None, :]
  for g, rank in enumerate(ranks):
    a_ref, b_ref, out_ref = refs[2 * g], refs[2 * g + 1], refs[2 * groups + g]
    b_rows = [plgpu.load(b_ref.at[n_T[:, None], r, k_K[None, :]], mask=nk_ok_TxK,
                         other=0.0).astype(jnp.float32) for r in range(rank)]
    for h0, size in chunks:
      h_H = h0 + jnp.arange(size, dtype=jnp.int32)
      nh_ok_TxH = n_ok_T[:, None] & (h_H < heads)[None, :]
      acc_TxHxK = jnp.zeros((block_t, size, k_K.shape[0]), jnp.float32)
      for r in range(rank):
        a_TxH = plgpu.load(a_ref.at[n_T[:, None], h_H[None, :], r], mask=nh_ok_TxH,
                           other=0.0).astype(jnp.float32)
        acc_TxHxK += a_TxH[:, :, None] * b_rows[r][:, None, :]
      acc_TxHxK = acc_TxHxK * (1.0 / rank)
      plgpu.store(out_ref.at[n_T[:, None, None], h_H[None, :, None], k_K[None, None, :]],
                  acc_TxHxK.astype(out_ref.dtype),
                  mask=nh_ok_TxH[:, :, None] & k_ok_K[None, None, :])


def _bwd_kernel(*refs, ranks, heads, head_dim, n_tokens, block_t, chunks):
  groups = len(ranks)
  n_T, n_ok_T, k_K, k_ok_K = _token_axes(n_tokens, block_t, head_dim)
  nk_ok_TxK = n_ok_T[:, None] & k_ok_K[None, :]
  for g, rank in enumerate(ranks):
    a_ref, b_ref, dout_ref = refs[3 * g], refs[3 * g + 1], refs[3 * g + 2]
    da_ref, db_ref = refs[3 * groups + 2 * g], refs[3 * groups + 2 * g + 1]
    b_rows = [plgpu.load(b_ref.at[n_T[:, None], r, k_K[None, :]], mask=nk_ok_TxK,
                         other=0.0).astype(jnp.float32) for r in range(rank)]
    db_rows = [jnp.zeros((block_t, k_K.shape[0]), jnp.float32) for _ in range(rank)]
    for h0, size in chunks:
      h_H = h0 + jnp.arange(size, dtype=jnp.int32)
      nh_ok_TxH = n_ok_T[:, None] & (h_H < heads)[None, :]
      # Masked lanes load as zero, so padded heads add nothing to dB.
      dout_TxHxK = plgpu.load(
          dout_ref.at[n_T[:, None, None], h_H[None, :, None], k_K[None, None, :]],
          mask=nh_ok_TxH[:, :, None] & k_ok_K[None, None, :],
          other=0.0).astype(jnp.float32) * (1.0 / rank)
      for r in range(rank):
        a_TxH = plgpu.load(a_ref.at[n_T[:, None], h_H[None, :], r], mask=nh_ok_TxH,
                           other=0.0).astype(jnp.float32)
        da_TxH = jnp.sum(dout_TxHxK * b_rows[r][:, None, :], axis=2)
        plgpu.store(da_ref.at[n_T[:, None], h_H[None, :], r], da_TxH.astype(da_ref.dtype),
                    mask=nh_ok_TxH)
        db_rows[r] = db_rows[r] + jnp.sum(dout_TxHxK * a_TxH[:, :, None], axis=1)
    for r in range(rank):
      plgpu.store(db_ref.at[n_T[:, None], r, k_K[None, :]], db_rows[r].astype(db_ref.dtype),
                  mask=nk_ok_TxK)


def _launch(kernel, name, inputs, out_shapes, *, ranks, heads, head_dim, tune, interpret):
  n_tokens = inputs[0].shape[0]
  block_t = _pow2(tune["block_t"])
  body = functools.partial(kernel, ranks=ranks, heads=heads, head_dim=head_dim,
                           n_tokens=n_tokens, block_t=block_t,
                           chunks=tuple(head_chunks(heads, tune["head_block"])))
  whole = lambda shape: pl.BlockSpec(shape, lambda i: (0,) * len(shape))
  extra = {}
  if not interpret:
    extra["compiler_params"] = plgpu.CompilerParams(num_warps=tune["num_warps"],
                                                    num_stages=tune["num_stages"])
  return pl.pallas_call(
      body,
      grid=(pl.cdiv(n_tokens, block_t),),
      in_specs=[whole(x.shape) for x in inputs],
      out_specs=[whole(s.shape) for s in out_shapes],
      out_shape=out_shapes,
      interpret=interpret,
      name=name,
      **extra,
  )(*inputs)


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
  inputs, out_shapes = [], []
  for (a, b), dout in zip(pairs, douts):
    inputs += [a, b, dout.astype(a.dtype)]
    out_shapes += [jax.ShapeDtypeStruct(a.shape, a.dtype), jax.ShapeDtypeStruct(b.shape, b.dtype)]
  return tuple(_launch(_bwd_kernel, "tpa_contract_bwd", inputs, out_shapes, ranks=ranks,
                       heads=heads, head_dim=head_dim, tune=dict(tune), interpret=interpret))


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
  n_tokens = 1
  for d in lead:
    n_tokens *= d
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
