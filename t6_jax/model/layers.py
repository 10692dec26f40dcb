"""Building blocks shared by every attention type: parameters with logical axes, norms, RoPE,
the SwiGLU MLP and the tied embedding."""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from t6_jax import kernels
from t6_jax.config import ModelConfig
from t6_jax.sharding import Rules, constrain, logical_to_spec, spec_axes


def uniform_init(bound: float):
  def init(key, shape, dtype):
    return jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)
  return init


def zeros_init(key, shape, dtype):
  del key
  return jnp.zeros(shape, dtype)


def ones_init(key, shape, dtype):
  del key
  return jnp.ones(shape, dtype)


def param(rngs: nnx.Rngs, init, shape: Sequence[int], axes: Sequence[str],
          cfg: ModelConfig) -> nnx.Param:
  """An fp32 (param_dtype) parameter tagged with logical axis names for the sharding rules."""
  assert len(shape) == len(axes), (shape, axes)
  value = init(rngs.params(), tuple(shape), jnp.dtype(cfg.param_dtype))
  return nnx.Param(value, logical_axes=tuple(axes))


def fan_in_param(rngs, fan_in: int, shape, axes, cfg) -> nnx.Param:
  """PyTorch's nn.Linear default: uniform(+-1/sqrt(fan_in))."""
  return param(rngs, uniform_init(1.0 / math.sqrt(fan_in)), shape, axes, cfg)


RMS_EPS = float(jnp.finfo(jnp.float32).eps)  # `rms_norm`'s default, the reference's


def rms_norm(x: jax.Array, eps: float | None = None) -> jax.Array:
  """Parameter-free RMSNorm in fp32; eps defaults to fp32 machine epsilon like the reference."""
  x32 = x.astype(jnp.float32)
  eps = RMS_EPS if eps is None else eps
  return x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)


class RMSNorm(nnx.Module):
  """RMSNorm with a learned weight (MLA's latent norms, TPA's optional per-head norm)."""

  def __init__(self, dim: int, eps: float, axis_name: str, cfg: ModelConfig, rngs: nnx.Rngs):
    self.eps = eps
    self.weight = param(rngs, ones_init, (dim,), (axis_name,), cfg)

  def __call__(self, x: jax.Array) -> jax.Array:
    return (rms_norm(x, self.eps) * self.weight[...].astype(jnp.float32)).astype(x.dtype)


def dense(spec: str, x, w, *, kernel: bool | None = None):
  """jnp.einsum(spec, x, w) for a projection x (rows ...) by weights w, with a one-row x (a
  decode step at batch 1) read as a vector-matrix product that reads w once. XLA's GPU
  simplifier rewrites such a product into an elementwise multiply and a reduction and writes
  the multiply out as a weight-sized temporary every step. On one GPU (kernel None) or with
  kernel=True the product runs the Pallas GEMV kernel (`kernels.gemv`; interpreted off GPU)
  where w's contracted axes lead or trail its others; on GPUs under a mesh (or kernel=False)
  a zero second row keeps it a GEMM. Other backends (kernel None) take the plain product."""
  lhs, rest = spec.split(",")
  rhs, out = rest.split("->")
  rows = [c for c in lhs if c in out and c not in rhs]
  if not rows or math.prod(x.shape[lhs.index(c)] for c in rows) != 1:
    return jnp.einsum(spec, x, w)
  contracted = "".join(c for c in rhs if c in lhs)
  kept = "".join(c for c in rhs if c not in lhs)
  layout = {contracted + kept: "kn", kept + contracted: "nk"}.get(rhs)
  if kernel is None:
    kernel = kernels.gemv_applies()
    if not kernel and kernels.target()[0] != "gpu":
      return jnp.einsum(spec, x, w)
  if kernel and layout and not any(c in out and c in lhs for c in rhs):
    size = lambda letters, shape, dims: math.prod(shape[dims.index(c)] for c in letters)
    x_K = jnp.einsum(f"{lhs}->{contracted}", x).reshape(-1)
    w_2d = w.reshape((size(contracted, w.shape, rhs), -1) if layout == "kn"
                     else (-1, size(contracted, w.shape, rhs)))
    y = kernels.gemv(x_K, w_2d, layout=layout).astype(jnp.result_type(x, w))
    y = y.reshape([1] * len(rows) + [w.shape[rhs.index(c)] for c in kept])
    return jnp.einsum(f"{''.join(rows)}{kept}->{out}", y)
  axis = lhs.index(rows[0])
  x2 = jnp.concatenate([x, jnp.zeros_like(x)], axis=axis)
  return jax.lax.slice_in_dim(jnp.einsum(spec, x2, w), 0, 1, axis=out.index(rows[0]))


# Where a decode loop's stored weights get their widths padded (`decode_padding`).
PAD_DECODE_WIDTHS_ON = ("gpu",)


def decode_padding(width: int, output_major: bool) -> int:
  """Zero columns that take a width of a decode loop's stored weights (the MLP's hidden
  units, TPA's packed projection) to a multiple of 64 for the GEMMs of a batch on GPU; 0
  elsewhere, and for the GEMV kernel's output-major matrices (batch 1), which take any width.
  XLA pads a ragged width for its GEMMs itself, inside the token loop and so in every step:
  at T6-XL (4266 hidden units) the SwiGLU between the MLP's products became a padding
  fusion of 9.2 us a layer on an H100, for 16 x 4266 values."""
  if output_major or kernels.target()[0] not in PAD_DECODE_WIDTHS_ON:
    return 0
  return -width % 64


def pack_columns(weights, output_major: bool = False):
  """Weights (D, ...) side by side as one matrix for one wide product: (D, N), or stored
  output-major (N, D) with `output_major`. Output-major rows are D long, so the GEMV kernel
  reads aligned 16-byte vectors where N (4266 at T6-XL's MLP, 1420 at its factor
  projections) would leave (D, N) rows misaligned."""
  w_DxN = jnp.concatenate([w.reshape(w.shape[0], -1) for w in weights], axis=1)
  return w_DxN.T if output_major else w_DxN


def packed_product(x_BxTxD, w, output_major: bool):
  """x times a `pack_columns` matrix: (B, T, N)."""
  return dense("btd,nd->btn" if output_major else "btd,dn->btn", x_BxTxD, w)


def one_row_gemv(x_BxTxD) -> bool:
  """Whether x (B, T, D) is one row whose products run the GEMV kernel (one GPU, no mesh):
  where the decode step's prologue fusions apply (`packed_partials`, `Mlp`, `Block`)."""
  return x_BxTxD.shape[0] * x_BxTxD.shape[1] == 1 and kernels.gemv_applies()


def packed_partials(x_BxTxD, w, output_major: bool, prenorm: bool = False, splits: int = 1,
                    tickets_for: int = 0):
  """`packed_product` of one token per row as partial sums to be added up by the consumer,
  and the tickets asked for: ((S, B*T, N), tickets or None). On one GPU a one-row product
  gives the GEMV kernel's fp32 K-split partials unsummed; several rows give `splits` fp32
  partials over equal K ranges (when they divide K; else S = 1, the product itself).
  prenorm: x is a block's residual stream, its `rms_norm` taken first (inside the GEMV
  kernel on the kernel path), then cast to w's dtype. tickets_for (one row on one GPU; None
  elsewhere): the tickets of the sublayer's last GEMV kernel (`gemv_sublayer_out` with that
  many outputs), written by this one."""
  batch, t_len, d = x_BxTxD.shape
  if one_row_gemv(x_BxTxD):
    prologue = ("rms_norm", RMS_EPS) if prenorm else None
    # The residual goes in as it is (the kernel's norm widens it to fp32).
    out = kernels.gemv_partials(x_BxTxD.reshape(d) if prenorm else
                                x_BxTxD.reshape(d).astype(w.dtype),
                                w, layout="nk" if output_major else "kn", prologue=prologue,
                                tickets_for=tickets_for)
    partials, tickets = out if tickets_for else (out, None)
    return partials[:, None, :], tickets
  if prenorm:
    x_BxTxD = rms_norm(x_BxTxD)
  x_BxTxD = x_BxTxD.astype(w.dtype)
  if splits > 1 and d % splits == 0:
    # XLA splits these few-row products over K itself and then sums the splits in a kernel
    # of its own; as a batched product the sum is left to the consumer (`tpa_step`).
    w_KxN = w.T if output_major else w
    return jnp.einsum("rsk,skn->srn", x_BxTxD.reshape(batch * t_len, splits, d // splits),
                      w_KxN.reshape(splits, d // splits, -1),
                      preferred_element_type=jnp.float32), None
  return packed_product(x_BxTxD, w, output_major).reshape(1, batch * t_len, -1), None


def gemv_sublayer_out(x, w_KxD, x_BxTxD, *, prologue: tuple, dtype, residual: bool,
                      tickets=None):
  """A sublayer's last product on one row by the GEMV kernel (w stored (K, D); `prologue`
  computes its input from x): x_BxTxD + the product in x_BxTxD's dtype with `residual` (the
  add inside the kernel, `tickets` from the sublayer's first kernel), else the product in
  `dtype`; shaped like x_BxTxD."""
  if residual:
    return kernels.gemv_residual(x, w_KxD, x_BxTxD.reshape(-1), prologue=prologue,
                                 tickets=tickets).reshape(x_BxTxD.shape)
  y_SxD = kernels.gemv_partials(x, w_KxD, prologue=prologue)
  return jnp.sum(y_SxD, axis=0).astype(dtype).reshape(x_BxTxD.shape)


# --------------------------------------------------------------------------------------------
# RoPE (half-split form, docs/model.md)


def rope_tables(positions_BxT: jax.Array, dim: int, base: float, bf16_tables: bool):
  """cos/sin of shape (B, T, dim/2). Rounded to bf16 when asked, as the reference does."""
  inv_freq = 1.0 / (base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
  angle_BxTxF = positions_BxT.astype(jnp.float32)[..., None] * inv_freq
  cos, sin = jnp.cos(angle_BxTxF), jnp.sin(angle_BxTxF)
  if bf16_tables:
    cos, sin = cos.astype(jnp.bfloat16), sin.astype(jnp.bfloat16)
  return cos, sin


def apply_rope(x: jax.Array, cos_BxTxF: jax.Array, sin_BxTxF: jax.Array) -> jax.Array:
  """Rotates the last axis of x (B, T, ..., dim); tables broadcast over the middle axes."""
  extra = x.ndim - 3
  cos = cos_BxTxF.reshape(cos_BxTxF.shape[:2] + (1,) * extra + cos_BxTxF.shape[2:])
  sin = sin_BxTxF.reshape(sin_BxTxF.shape[:2] + (1,) * extra + sin_BxTxF.shape[2:])
  cos, sin = cos.astype(x.dtype), sin.astype(x.dtype)
  half = x.shape[-1] // 2
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], axis=-1)


# --------------------------------------------------------------------------------------------


class Mlp(nnx.Module):
  """SwiGLU: c_proj(silu(c_fc1 x) * c_fc2 x), output projection zero-initialised."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, rules: Rules):
    d, f = cfg.d_model, cfg.mlp_dim
    self.dtype, self.rules = jnp.dtype(cfg.dtype), rules
    self.swiglu_impl = cfg.swiglu_impl
    self.c_fc1 = fan_in_param(rngs, d, (d, f), ("embed", "mlp"), cfg)
    self.c_fc2 = fan_in_param(rngs, d, (d, f), ("embed", "mlp"), cfg)
    self.c_proj = param(rngs, zeros_init, (f, d), ("mlp", "embed"), cfg)

  def __call__(self, x_BxTxD: jax.Array, prenorm: bool = False,
               residual: bool = False) -> jax.Array:
    """prenorm: x is the block's residual stream, to be normalised here (`rms_norm`): inside
    the GEMV kernel at batch 1 on one GPU. residual: return x + the output (in x's dtype):
    the add inside the last GEMV kernel there."""
    packed = getattr(self, "packed_fc", None)  # set by `pack_projection` (decoding)
    if packed is not None and one_row_gemv(x_BxTxD):
      # One row on one GPU: two GEMV kernels, the first normalising x (prenorm), the second
      # computing silu(gate) * up from the first's unsummed partials and (residual) adding
      # its own product to x.
      w_FxD = self.packed_out[...]
      gate_up_SxN, tickets = packed_partials(x_BxTxD, packed[...], self.packed_output_major,
                                             prenorm, tickets_for=w_FxD.shape[1] if residual else 0)
      return gemv_sublayer_out(gate_up_SxN[:, 0, :], w_FxD, x_BxTxD, prologue=("swiglu",),
                               dtype=self.dtype, residual=residual, tickets=tickets)
    if residual:
      return x_BxTxD + self(x_BxTxD, prenorm).astype(x_BxTxD.dtype)
    if prenorm:
      x_BxTxD = rms_norm(x_BxTxD)
    x = x_BxTxD.astype(self.dtype)
    if packed is not None:
      w_proj = self.packed_out[...]
      gate_BxTxF, up_BxTxF = jnp.split(
          packed_product(x, packed[...], self.packed_output_major), 2, axis=-1)
    else:
      w_proj = self.c_proj[...].astype(self.dtype)
      w_fc1, w_fc2 = (w[...].astype(self.dtype) for w in (self.c_fc1, self.c_fc2))
      # Zero hidden units up to the width the SwiGLU kernel takes (silu(0) * 0 = 0 meets
      # zero rows of c_proj: the same output, and the gradients' extra columns are dropped
      # by the pads' transposes). Not where the rules split the hidden axis.
      pad = 0 if self.rules.mesh_axes("mlp") else kernels.swiglu_padding(
          w_fc1.shape[1], impl=self.swiglu_impl)
      if pad:
        w_fc1, w_fc2 = (jnp.pad(w, ((0, 0), (0, pad))) for w in (w_fc1, w_fc2))
        w_proj = jnp.pad(w_proj, ((0, pad), (0, 0)))
      gate_BxTxF = dense("btd,df->btf", x, w_fc1)
      up_BxTxF = dense("btd,df->btf", x, w_fc2)
    h_BxTxF = kernels.swiglu(gate_BxTxF, up_BxTxF, impl=self.swiglu_impl, rules=self.rules)
    h_BxTxF = constrain(h_BxTxF, ("batch", "length", "act_mlp"), self.rules)
    return dense("btf,fd->btd", h_BxTxF, w_proj)

  def pack_projection(self, output_major: bool = False):
    """Stores c_fc1 and c_fc2 side by side on this (one layer's) module as `packed_fc`
    (`pack_columns`), so a decode step reads x once in one product, and c_proj as
    `packed_out`. Not where the rules split the hidden axis (tensor parallelism): the
    concatenation would mix shards. The hidden width gets zero units by `decode_padding`
    (silu(0) * 0 = 0 meets zero rows of c_proj: the same output)."""
    if not self.rules.mesh_axes("mlp"):
      w_fc1, w_fc2, w_proj = (w[...].astype(self.dtype)
                              for w in (self.c_fc1, self.c_fc2, self.c_proj))
      pad = decode_padding(w_fc1.shape[1], output_major)
      if pad:
        w_fc1, w_fc2 = (jnp.pad(w, ((0, 0), (0, pad))) for w in (w_fc1, w_fc2))
        w_proj = jnp.pad(w_proj, ((0, pad), (0, 0)))
      self.packed_fc = nnx.Variable(pack_columns([w_fc1, w_fc2], output_major))
      self.packed_out = nnx.Variable(w_proj)
      self.packed_output_major = output_major
      del self.c_fc1, self.c_fc2, self.c_proj  # replaced by the packed copies


def vocab_sharded_lookup(table_VxD: jax.Array, tokens_BxT: jax.Array,
                         rules: Rules) -> jax.Array | None:
  """Rows of a table split along the vocabulary (tensor parallelism: `vocab` over `tensor`),
  looked up where they lie: each shard takes the ids of its own range (zeros for the others)
  and a sum over the vocabulary's mesh axes adds the shards' rows. None where the rules do not
  split the vocabulary on the current mesh (or split it over a batch axis).

  XLA's partitioner answers a gather from a vocab-split table by gathering the whole table onto
  every device first: at T6-XL 322 MB in fp32 in every decode step (`python -m
  t6_jax.decode.aot`, v5e:2x4, data=4 x tensor=2), for a few rows. Exact: one shard holds each
  row and the others add zeros."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return None
  vocab_axes = spec_axes(logical_to_spec(("vocab", None), rules, table_VxD.shape, mesh))[0]
  token_spec = logical_to_spec(("batch", None), rules, tokens_BxT.shape, mesh)
  if not vocab_axes or set(vocab_axes) & {a for axes in spec_axes(token_spec) for a in axes}:
    return None

  def local(table_vxD, tokens_BxT):
    rows = table_vxD.shape[0]
    ids_BxT = tokens_BxT - jax.lax.axis_index(vocab_axes) * rows
    mine_BxT = (ids_BxT >= 0) & (ids_BxT < rows)
    x_BxTxD = jnp.take(table_vxD, jnp.where(mine_BxT, ids_BxT, 0), axis=0)
    return jax.lax.psum(jnp.where(mine_BxT[..., None], x_BxTxD, 0), vocab_axes)

  return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(vocab_axes, None), token_spec),
                               out_specs=P(*token_spec, None)))(table_VxD, tokens_BxT)


class Embed(nnx.Module):
  """Token embedding tied to the LM head (uniform +-1/sqrt(d), as the reference's head)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, rules: Rules):
    self.dtype, self.rules = jnp.dtype(cfg.dtype), rules
    self.wte = fan_in_param(rngs, cfg.d_model, (cfg.vocab_size, cfg.d_model),
                            ("vocab", "embed"), cfg)

  def __call__(self, tokens_BxT: jax.Array) -> jax.Array:
    looked_up = vocab_sharded_lookup(self.wte[...], tokens_BxT, self.rules)
    if looked_up is not None:
      return looked_up
    return jnp.take(constrain(self.wte[...], (None, "embed"), self.rules), tokens_BxT, axis=0)

  def logits(self, x_BxTxD: jax.Array) -> jax.Array:
    """Logits computed in the compute dtype, then cast to fp32 for the loss, as the reference
    does under autocast. Writing the (B, T, V) product in bf16 rather than fp32 halves the
    largest activation's traffic: 1.16x (MHA) to 1.12x (T6) faster training on an H200."""
    return jnp.einsum("btd,vd->btv", x_BxTxD.astype(self.dtype),
                      self.wte[...].astype(self.dtype)).astype(jnp.float32)
