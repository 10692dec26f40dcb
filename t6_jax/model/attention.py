"""The attention types behind one interface: TPA (T6), TPA-KVonly, MHA/MQA/GQA and MLA.

Every type splits its work into steps so that training, prefill and cached decoding share the
same math (`Attention` declares them):

  queries(x, rope)   -> what each query position contributes: `FullQueries` (per-head q) or
                        `TPAQueries` (the A_q, RoPE-rotated B_q factors)
  entries(x, rope)   -> what each key position contributes: exactly what a decode cache stores
                        (TPA: A_k, RoPE-rotated B_k, A_v, B_v; MHA family: rotated K, V;
                        MLA: normalised latent and rotated shared rope key)
  attend(q, entries, mask)          -> per-head outputs (B, T, H, Dv), K/V materialised
  attend_factors(q, entries, mask)  -> the same from a decode cache's own entries (the decode
                                       fast path; TPA and MLA never expand K/V)
  out(y)             -> the output projection to d_model.
`__call__` runs them for training, or with a `LayerCache` writes the new entries into the
decode cache and attends to it.

`ENTRY_AXES` gives each entry's logical axis names so a cache shards like the activations.
Shapes in names: B batch, T query length, S key length, D d_model, H heads, G KV heads,
K head dim, Q/R ranks of the query/key-value factors, L latent.
"""

from __future__ import annotations

import abc
import dataclasses
import itertools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from t6_jax import kernels
from t6_jax.kernels import tpa_decode_gpu
from t6_jax.config import ModelConfig
from t6_jax.kernels import Mask  # noqa: F401  (part of this interface)
from t6_jax.model.layers import (RMSNorm, apply_rope, decode_padding, dense, fan_in_param,
                                 gemv_sublayer_out, one_row_gemv, pack_columns,
                                 packed_partials, packed_product, param, uniform_init,
                                 zeros_init)
from t6_jax.sharding import Rules, constrain

# K splits of the packed factor projection in a decode step of several rows (the split count
# XLA chose itself for t6-small at batch 16), summed inside `tpa_step`.
PROJECTION_SPLITS = 4
# The packed factor projection's width is padded to a multiple of this in `project`.
PACKED_WIDTH_MULTIPLE = 128


@dataclasses.dataclass(frozen=True)
class FullQueries:
  """One query vector per head (MHA family, TPA-KVonly; MLA: [q_nope, rotated q_pe])."""

  q_BxTxHxK: jax.Array


@dataclasses.dataclass(frozen=True)
class TPAQueries:
  """TPA's query factors: Q[h] = (1/R_q) sum_q A_q[h, q] B_q[q], B_q rows RoPE-rotated."""

  a_q_BxTxHxQ: jax.Array
  b_q_BxTxQxK: jax.Array


jax.tree_util.register_dataclass(FullQueries, data_fields=["q_BxTxHxK"], meta_fields=[])
jax.tree_util.register_dataclass(TPAQueries, data_fields=["a_q_BxTxHxQ", "b_q_BxTxQxK"],
                                 meta_fields=[])
Queries = FullQueries | TPAQueries


def roll_rows(x_BxTx_, shift_B):
  """Row b of x rotated along its second axis by shift_B[b] (out[b, t] = x[b, t - shift])."""
  return jax.vmap(lambda x, shift: jnp.roll(x, shift, axis=0))(x_BxTx_, shift_B)


@dataclasses.dataclass(frozen=True)
class LayerCache:
  """One layer's view of the stacked decode cache during `Transformer.extend`.

  entries: {name: (layers, B, S, ...)} of every layer; layer: int32 index; start: slot of the
  first new token; pad_B: (B,) leading padding slots; kv_len (static): slots attended to;
  path (static): "materialize" (attend), "factors" (attend_factors), "kernel" (the fused
  one-token decode kernel of `kernels.tpa_decode`, reading the stacked cache in place) or
  "prompt" (`Transformer.prefill`: the queries attend to their own new entries, which are
  then stored);
  kernel (static): which one ("triton" or "mosaic", `kernels.decode_kernel`);
  layout (static): None for the standard (layers, B, S, ...) entries, or the
  `kernels.FactorCacheLayout` the TPU kernel reads in place (new entries are written in it,
  and the XLA paths read a layer back in the standard form).
  """

  entries: dict
  layer: jax.Array
  start: jax.Array
  pad_B: jax.Array
  kv_len: int
  path: str = "materialize"
  kernel: str | None = None
  layout: kernels.FactorCacheLayout | None = None

  def write(self, new: dict) -> dict:
    """The stacked entries with this layer's new slots start .. start+T-1 written in place."""
    out = {}
    for name, cache in self.entries.items():
      x = new[name].astype(cache.dtype)
      slot_axis = 2
      if self.layout is not None:
        x, slot_axis = self.layout.to_cache(name, x), self.layout.slot_axis(name)
      index = [0] * cache.ndim
      index[0], index[slot_axis] = self.layer, self.start
      out[name] = jax.lax.dynamic_update_slice(cache, x[None], tuple(index))
    return out

  def rotated_back(self, new: dict) -> dict:
    """Entries of a one-pass prefill (`Transformer.prefill`: rows rotated left by their
    padding) rotated right again, so each prompt ends at slot T-1 as `extend` stores it."""
    return {name: roll_rows(x, self.pad_B) for name, x in new.items()}

  def view(self, entries: dict, dtype) -> dict:
    """This layer's slots [0, kv_len) in the compute dtype (standard layout)."""
    out = {}
    for name, cache in entries.items():
      x = jax.lax.dynamic_index_in_dim(cache, self.layer, keepdims=False)
      if self.layout is None:
        x = x[:, :self.kv_len]
      else:
        x = self.layout.from_cache(
            name, jax.lax.slice_in_dim(x, 0, self.kv_len,
                                       axis=self.layout.slot_axis(name) - 1))
      out[name] = x.astype(dtype)
    return out


jax.tree_util.register_dataclass(LayerCache, data_fields=["entries", "layer", "start", "pad_B"],
                                 meta_fields=["kv_len", "path", "kernel", "layout"])


class Attention(nnx.Module):
  """What every attention type provides, and the shared plumbing: the output projection and
  the call for training (no cache) or decoding (a `LayerCache`)."""

  ENTRY_AXES: dict[str, tuple[str, ...]] = {}
  cfg: ModelConfig
  dtype: jnp.dtype
  rules: Rules

  @abc.abstractmethod
  def queries(self, x_BxTxD, rope) -> Queries:
    """The query side of T positions."""

  @abc.abstractmethod
  def entries(self, x_BxTxD, rope) -> dict[str, jax.Array]:
    """The key side of T positions: the arrays a decode cache stores, named as ENTRY_AXES."""

  @abc.abstractmethod
  def attend(self, q: Queries, e: dict, mask: Mask) -> jax.Array:
    """Per-head outputs (B, T, H, Dv) of T queries over S keys, K and V materialised."""

  def project(self, x_BxTxD, rope) -> tuple[Queries, dict[str, jax.Array]]:
    """(queries, entries) of T positions; types may compute both in fewer GEMMs."""
    return self.queries(x_BxTxD, rope), self.entries(x_BxTxD, rope)

  def attend_factors(self, q: Queries, e: dict, mask: Mask) -> jax.Array:
    """`attend` from the cache's own entries (decoding). Types whose cache holds K and V
    (MHA family) have nothing to gain over `attend`."""
    return self.attend(q, e, mask)

  def attend_kernel(self, q: Queries, cache: LayerCache, entries: dict) -> jax.Array:
    raise ValueError(f"attention {self.cfg.attention!r} has no fused decode kernel; use "
                     f"decode.attention_kernel=xla")

  def __call__(self, x_BxTxD, rope, mask: Mask, cache: LayerCache | None = None):
    """(B, T, D) outputs and, with `cache`, the stacked cache entries with this layer's new
    entries written (the queries then attend to slots [0, kv_len) of the cache)."""
    q, new = self.project(x_BxTxD, rope)
    if cache is None:
      return self.out(self.attend(q, new, mask)), None
    if cache.path == "prompt":  # an empty cache: attend as in training, then store
      return self.out(self.attend(q, new, mask)), cache.write(cache.rotated_back(new))
    entries = cache.write(new)
    if cache.path == "kernel":
      y = self.attend_kernel(q, cache, entries)
    elif cache.path == "factors":
      y = self.attend_factors(q, cache.view(entries, self.dtype), mask)
    else:
      y = self.attend(q, cache.view(entries, self.dtype), mask)
    return self.out(y), entries

  def out(self, y_BxTxHxV):
    y_BxTxHxV = constrain(y_BxTxHxV, ("batch", "length", "act_heads", None), self.rules)
    return dense("bthv,hvd->btd", y_BxTxHxV, self.c_proj[...].astype(self.dtype))

  def _proj(self, x, w, spec):
    return dense(spec, x.astype(self.dtype), w[...].astype(self.dtype))

  def _constrain_q(self, q_BxTxHxK):
    return constrain(q_BxTxHxK, ("batch", "length", "act_heads", None), self.rules)


def kernel_query(q: Queries, q_rank: int, k_rank: int, head_dim: int):
  """The contracted, scaled fp32 query (B, H, d_h) of a one-token step that
  `kernels.tpa_decode` takes: Q[h] = sum_q A_q[h,q] B_q[q] / (R_q R_k sqrt(d_h))
  (TPA-KVonly: q / (R_k sqrt(d_h)))."""
  f32 = jnp.float32
  if isinstance(q, FullQueries):
    q_BxHxK = q.q_BxTxHxK[:, 0].astype(f32) / k_rank
  else:
    q_BxHxK = jnp.einsum("bhq,bqk->bhk", q.a_q_BxTxHxQ[:, 0].astype(f32),
                         q.b_q_BxTxQxK[:, 0].astype(f32)) / (q_rank * k_rank)
  return q_BxHxK / math.sqrt(head_dim)


class TPA(Attention):
  """Tensor Product Attention (T6) and its K/V-only variant (`tpa_kvonly`).

  Q, K, V are contracted from contextual factors: Q[h] = (1/R_q) sum_r A_q[h, r] B_q[r],
  with RoPE applied to the rows of B_q and B_k before the contraction.
  """

  ENTRY_AXES = {
      "a_k": ("batch", "cache_length", "act_heads", "kv_rank"),
      "b_k": ("batch", "cache_length", "kv_rank", "head_dim"),
      "a_v": ("batch", "cache_length", "act_heads", "kv_rank"),
      "b_v": ("batch", "cache_length", "kv_rank", "head_dim"),
  }

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, rules: Rules):
    d, h, k = cfg.d_model, cfg.num_heads, cfg.head_dim
    self.cfg, self.rules = cfg, rules
    self.dtype = jnp.dtype(cfg.dtype)
    self.factor_q = cfg.attention == "tpa"

    def a_factor(rank, rank_axis):  # Xavier on the (d, h, R) view
      bound = math.sqrt(6.0 / (rank * (h + d)))
      return param(rngs, uniform_init(bound), (d, h, rank), ("embed", "heads", rank_axis), cfg)

    def b_factor(rank, rank_axis):  # Xavier on the (d, R, d_h) view
      bound = math.sqrt(6.0 / (k * (rank + d)))
      return param(rngs, uniform_init(bound), (d, rank, k), ("embed", rank_axis, "head_dim"),
                   cfg)

    if self.factor_q:
      self.W_A_q = a_factor(cfg.q_rank, "q_rank")
      self.W_B_q = b_factor(cfg.q_rank, "q_rank")
    else:  # full query projection, Xavier-uniform on (d, h*d_h)
      self.c_q = param(rngs, uniform_init(math.sqrt(6.0 / (d + h * k))), (d, h, k),
                       ("embed", "heads", "head_dim"), cfg)
    self.W_A_k = a_factor(cfg.k_rank, "kv_rank")
    self.W_B_k = b_factor(cfg.k_rank, "kv_rank")
    self.W_A_v = a_factor(cfg.v_rank, "kv_rank")
    self.W_B_v = b_factor(cfg.v_rank, "kv_rank")
    self.c_proj = param(rngs, zeros_init, (h, k, d), ("heads", "head_dim", "embed"), cfg)
    self.subln = RMSNorm(k, 1e-5, "head_dim", cfg, rngs) if cfg.head_norm else None

  def queries(self, x_BxTxD, rope) -> Queries:
    if not self.factor_q:
      return FullQueries(apply_rope(self._proj(x_BxTxD, self.c_q, "btd,dhk->bthk"), *rope))
    a_q_BxTxHxQ = self._proj(x_BxTxD, self.W_A_q, "btd,dhq->bthq")
    b_q_BxTxQxK = apply_rope(self._proj(x_BxTxD, self.W_B_q, "btd,dqk->btqk"), *rope)
    return TPAQueries(a_q_BxTxHxQ, b_q_BxTxQxK)

  def entries(self, x_BxTxD, rope):
    return {
        "a_k": self._proj(x_BxTxD, self.W_A_k, "btd,dhr->bthr"),
        "b_k": apply_rope(self._proj(x_BxTxD, self.W_B_k, "btd,drk->btrk"), *rope),
        "a_v": self._proj(x_BxTxD, self.W_A_v, "btd,dhr->bthr"),
        "b_v": self._proj(x_BxTxD, self.W_B_v, "btd,drk->btrk"),
    }

  def __call__(self, x_BxTxD, rope, mask: Mask, cache: LayerCache | None = None):
    if cache is not None and self.fused_step(cache, x_BxTxD.shape[1]):
      return self.fused_decode_step(x_BxTxD, rope, cache)
    return super().__call__(x_BxTxD, rope, mask, cache)

  def fused_step(self, cache: LayerCache, t_len: int) -> bool:
    """Whether a decode step runs `fused_decode_step`: one token per row, the Triton kernel
    on one device reading the cache in its layout, the factor projections packed."""
    return (t_len == 1 and cache.path == "kernel" and cache.kernel == "triton"
            and cache.layout is not None and cache.layout.shards == 1
            and self.packs_projection() and kernels.target()[1] is None)

  def fused_decode_step(self, x_BxTxD, rope, cache: LayerCache, prenorm: bool = False,
                        residual: bool = False):
    """A one-token decode step in three kernels after the norm: the packed factor
    projection (left as the GEMV kernel's partial sums at batch 1), `kernels.tpa_step`
    (the new entries written into the cache in place and the query rows built: what XLA
    runs as about nine small kernels) and the decode kernel from those rows. The same
    values as `project`, `LayerCache.write` and `attend_kernel`. prenorm: x is the block's
    residual stream, normalised inside the projection's GEMV kernel at batch 1 (`Block`). At
    batch 1 the decode kernel's splits are merged inside the output projection's GEMV
    kernel too (up to tpa_decode_gpu.COMBINE_KERNEL_SPLITS splits, without a head norm).
    residual: return (x + the output, in x's dtype: the add inside that GEMV kernel at
    batch 1), not the output."""
    cfg = self.cfg
    # (tickets: for the output projection's residual epilogue, one row on one GPU)
    y_SxBxN, tickets = packed_partials(x_BxTxD if prenorm else x_BxTxD.astype(self.dtype),
                                       *self.packed_weights(), prenorm,
                                       splits=PROJECTION_SPLITS,
                                       tickets_for=x_BxTxD.shape[-1] if residual else 0)
    names = ("a_k", "b_k", "a_v", "b_v")
    q_hi, q_lo, *new = kernels.tpa_step(
        y_SxBxN, *rope, *(cache.entries[n] for n in names), cache.layer, cache.start,
        heads=cfg.num_heads, head_dim=cfg.head_dim, q_rank=cfg.q_rank if self.factor_q else 0,
        compute_dtype=self.dtype)
    m, l, acc = kernels.tpa_decode_rows(q_hi, q_lo, *new, cache.layer, cache.pad_B,
                                        cache.start, heads=cfg.num_heads,
                                        head_dim=cfg.head_dim, kv_len=cache.kv_len,
                                        merge=False)
    entries = dict(zip(names, new))
    if (one_row_gemv(x_BxTxD) and self.subln is None
        and acc.shape[1] <= tpa_decode_gpu.COMBINE_KERNEL_SPLITS):
      # One row: the output projection's GEMV kernel merges the splits in its prologue (each
      # program its own heads), in place of the combine kernel's launch.
      w = self.c_proj[...].astype(self.dtype)
      return gemv_sublayer_out((acc[0], m[0], l[0]), w.reshape(-1, w.shape[-1]), x_BxTxD,
                               prologue=("combine", cfg.num_heads, cfg.head_dim, cfg.v_rank),
                               dtype=self.dtype, residual=residual, tickets=tickets), entries
    y_BxHxK = kernels.merge_splits(m, l, acc, heads=cfg.num_heads, head_dim=cfg.head_dim,
                                   v_rank=cfg.v_rank, out_dtype=self.dtype)
    y_BxTxD = self.out(self.head_norm(y_BxHxK[:, None]))
    return (x_BxTxD + y_BxTxD.astype(x_BxTxD.dtype) if residual else y_BxTxD), entries

  def project(self, x_BxTxD, rope):
    """`queries` and `entries` from one GEMM: the factor projections (or the full query and
    the K/V factors of TPA-KVonly) concatenated along their output width, so x is read once
    and one wide GEMM replaces six narrow ones (68 to 384 columns at T6-small), forward and
    backward. The parameters stay separate. Where the rules split heads or ranks over the
    mesh (tensor parallelism) the concatenation would mix shardings: separate GEMMs then."""
    if not self.packs_projection():
      return super().project(x_BxTxD, rope)
    names = self.projection_names()
    shapes = self.projection_shapes()
    x_BxTxD = x_BxTxD.astype(self.dtype)
    w_packed, output_major = self.packed_weights()
    width = sum(math.prod(shape) for shape in shapes)
    if getattr(self, "packed_proj", None) is None:
      # Concatenated in this step (training, prefill): zero columns up to a multiple of 128
      # ride along in the same copy. The backward's dX product contracts over this width,
      # and a ragged one (980 at T6-small) ran at 183 TFLOP/s on an H200 where the forward
      # ran at 490 (t6-small trains 3.4% faster padded). Stored packed weights (decoding)
      # are read as they are, not copied in every step.
      w_packed = jnp.pad(w_packed, ((0, 0), (0, -width % PACKED_WIDTH_MULTIPLE)))
    y_BxTxN = packed_product(x_BxTxD, w_packed, output_major)
    lead = x_BxTxD.shape[:-1]
    rotated = ("W_B_q", "c_q", "W_B_k")  # turned by RoPE
    if len(lead) == 2 and getattr(self, "packed_proj", None) is None:
      # Training and prefill: the pieces (and RoPE) by `kernels.unpack_factors`, whose
      # backward writes the padded gradient in one pass with the contraction kernels.
      pieces = kernels.unpack_factors(
          y_BxTxN, [math.prod(shape) for shape in shapes], [n in rotated for n in names],
          *rope, apply_rope, impl=self.cfg.contract_impl, rules=self.rules)
      out = {n: y.reshape(lead + shape) for n, shape, y in zip(names, shapes, pieces)}
    else:
      bounds = list(itertools.accumulate(math.prod(shape) for shape in shapes))[:-1]
      out = {n: y.reshape(lead + shape) for n, shape, y in zip(
          names, shapes, jnp.split(y_BxTxN[..., :width], bounds, axis=-1))}
      out = {n: apply_rope(y, *rope) if n in rotated else y for n, y in out.items()}
    if self.factor_q:
      q = TPAQueries(out["W_A_q"], out["W_B_q"])
    else:
      q = FullQueries(out["c_q"])
    entries = {"a_k": out["W_A_k"], "b_k": out["W_B_k"], "a_v": out["W_A_v"],
               "b_v": out["W_B_v"]}
    return q, entries

  def packs_projection(self) -> bool:
    """Whether `project` runs one GEMM: not where the rules split heads or ranks."""
    return not any(self.rules.mesh_axes(a) for a in ("heads", "q_rank", "kv_rank", "head_dim"))

  def projection_names(self) -> tuple[str, ...]:
    names = ("W_A_q", "W_B_q") if self.factor_q else ("c_q",)
    return names + ("W_A_k", "W_B_k", "W_A_v", "W_B_v")

  def projection_shapes(self) -> tuple[tuple[int, ...], ...]:
    """Each projection's output shape per token, in `projection_names` order (the weights'
    shapes after d_model; the packed matrix stands in for the weights in decoding)."""
    cfg = self.cfg
    h, k, r_k, r_v = cfg.num_heads, cfg.head_dim, cfg.k_rank, cfg.v_rank
    query = ((h, cfg.q_rank), (cfg.q_rank, k)) if self.factor_q else ((h, k),)
    return query + ((h, r_k), (r_k, k), (h, r_v), (r_v, k))

  def packed_projection(self, output_major: bool = False):
    """The factor projections' weights side by side (`pack_columns`) in the compute dtype."""
    return pack_columns([getattr(self, n)[...].astype(self.dtype)
                         for n in self.projection_names()], output_major)

  def packed_weights(self):
    """(packed matrix, output_major): the one `pack_projection` stored (decoding), else the
    projections concatenated here (training, prefill)."""
    packed = getattr(self, "packed_proj", None)
    if packed is None:
      return self.packed_projection(), False
    return packed[...], self.packed_output_major

  def pack_projection(self, output_major: bool = False):
    """Stores `packed_projection()` on this (one layer's) module as `packed_proj`, so a decode
    loop reads packed weights instead of concatenating them in every step (XLA does not hoist
    the concatenation out of the token loop). Not where `project` takes separate GEMMs. Zero
    columns pad the width for a batch's GEMMs (`decode_padding`; 1420 at T6-XL)."""
    if self.packs_projection():
      w = self.packed_projection(output_major)
      pad = decode_padding(w.shape[int(not output_major)], output_major)
      if pad:
        w = jnp.pad(w, ((0, pad), (0, 0)) if output_major else ((0, 0), (0, pad)))
      self.packed_proj = nnx.Variable(w)
      self.packed_output_major = output_major
      for name in self.projection_names():  # the packed copy replaces them: no second copy
        delattr(self, name)

  def materialize(self, q: Queries, e) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Q, K and V (B, T|S, H, d_h) from their factors, by model.contract_impl: XLA's einsum,
    or the Pallas kernels contracting every pair of one length in one launch (q, k and v in
    training)."""
    pairs = [(e["a_k"], e["b_k"]), (e["a_v"], e["b_v"])]
    if isinstance(q, TPAQueries):
      pairs.insert(0, (q.a_q_BxTxHxQ, q.b_q_BxTxQxK))
    out = kernels.tpa_contract(pairs, impl=self.cfg.contract_impl, rules=self.rules)
    return (q.q_BxTxHxK, *out) if isinstance(q, FullQueries) else tuple(out)

  def attend(self, q: Queries, e, mask: Mask):
    q_BxTxHxK, k_BxSxHxK, v_BxSxHxK = self.materialize(q, e)
    y_BxTxHxK = kernels.attention(self._constrain_q(q_BxTxHxK), k_BxSxHxK, v_BxSxHxK, mask,
                                  scale=1.0 / math.sqrt(self.cfg.head_dim),
                                  impl=self.cfg.attention_impl, rules=self.rules)
    return self.head_norm(y_BxTxHxK)

  def head_norm(self, y_BxTxHxK):
    return y_BxTxHxK if self.subln is None else self.subln(y_BxTxHxK)

  def attend_factors(self, q: Queries, e, mask: Mask):
    """`attend` computed straight from the factors, never materialising K or V (decoding).

    The FlashTPA dataflow (docs/model.md), for T queries against S cached keys:
      P[t,q,s,r]  = <B_q[t,q], B_k[s,r]>                    head-shared, reads B_k once
      logit[t,h,s] = sum_r A_k[s,h,r] sum_q A_q[t,h,q] P[t,q,s,r] / (sqrt(d_h) R_q R_k)
      out[t,h]    = sum_{s,u} (alpha[t,h,s] A_v[s,h,u]) B_v[s,u] / R_v
    FLOPs per cached key: R_q R_k d_h + h R_q R_k + h R_v d_h (vs 2 h d_h materialised).
    TPA-KVonly has a full query: its logits are sum_r A_k[s,h,r] <Q[t,h], B_k[s,r]>.
    """
    cfg = self.cfg
    f32 = jnp.float32
    a_k_BxSxHxR, b_k_BxSxRxK = e["a_k"], e["b_k"]
    # Everything stays in the cache's own (S, H) order: transposing A_k / A_v to (H, S) each
    # step would copy the biggest cache entries (measured 1.45x slower on an H200).
    if isinstance(q, FullQueries):
      qb_BxTxSxHxR = jnp.einsum("bthk,bsrk->btshr", q.q_BxTxHxK,
                                b_k_BxSxRxK.astype(q.q_BxTxHxK.dtype),
                                preferred_element_type=f32)
      logits_BxTxSxH = jnp.einsum("btshr,bshr->btsh", qb_BxTxSxHxR, a_k_BxSxHxR.astype(f32))
      scale = 1.0 / (math.sqrt(cfg.head_dim) * cfg.k_rank)
    else:
      # Head-shared P: one batched GEMM over the cached B_k rows (R_q x R_k per key).
      p_BxTxSxRxQ = jnp.einsum("bsrk,btqk->btsrq", b_k_BxSxRxK,
                               q.b_q_BxTxQxK.astype(b_k_BxSxRxK.dtype),
                               preferred_element_type=f32)
      logits_BxTxSxH = jnp.einsum("bshr,btsrq,bthq->btsh", a_k_BxSxHxR.astype(f32),
                                  p_BxTxSxRxQ, q.a_q_BxTxHxQ.astype(f32))
      scale = 1.0 / (math.sqrt(cfg.head_dim) * cfg.q_rank * cfg.k_rank)
    t_len, s_len = logits_BxTxSxH.shape[1], logits_BxTxSxH.shape[2]
    logits_BxTxSxH = logits_BxTxSxH * scale
    keep_BxTxS = mask.keep(t_len, s_len)
    if keep_BxTxS is not None:
      logits_BxTxSxH = jnp.where(keep_BxTxS[..., None], logits_BxTxSxH, -jnp.inf)
    probs_BxTxSxH = jax.nn.softmax(logits_BxTxSxH, axis=2)
    # out[h] = sum_u sum_s (alpha[h, s] A_v[s, h, u]) B_v[s, u]: one GEMM per value rank, each
    # contracting S in place (no (H, S, R) copy).
    y_BxTxHxK = 0.0
    for u in range(cfg.v_rank):
      w_BxTxSxH = (probs_BxTxSxH * e["a_v"][:, None, :, :, u].astype(f32)).astype(e["b_v"].dtype)
      y_BxTxHxK = y_BxTxHxK + jnp.einsum("btsh,bsk->bthk", w_BxTxSxH, e["b_v"][:, :, u, :],
                                         preferred_element_type=f32)
    y_BxTxHxK = y_BxTxHxK / cfg.v_rank
    return self.head_norm(y_BxTxHxK.astype(self.dtype))

  def attend_kernel(self, q: Queries, cache: LayerCache, entries: dict):
    """`attend_factors` for one query token (T == 1) by the fused decode kernel, reading
    layer `cache.layer` of the stacked cache in place (no per-layer slice is copied)."""
    q_BxHxK = kernel_query(q, self.cfg.q_rank, self.cfg.k_rank, self.cfg.head_dim)
    y_BxHxK = kernels.tpa_decode(q_BxHxK, entries["a_k"], entries["b_k"], entries["a_v"],
                                 entries["b_v"], cache.layer, cache.pad_B, cache.start,
                                 kv_len=cache.kv_len, kernel=cache.kernel, rules=self.rules)
    return self.head_norm(y_BxHxK[:, None].astype(self.dtype))


class GQA(Attention):
  """Multi-head attention with G KV heads: MHA (G = H), GQA (G | H) and MQA (G = 1)."""

  ENTRY_AXES = {
      "k": ("batch", "cache_length", "act_kv_heads", "head_dim"),
      "v": ("batch", "cache_length", "act_kv_heads", "head_dim"),
  }

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, rules: Rules):
    d, h, g, k = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_dim
    self.cfg, self.rules = cfg, rules
    self.dtype = jnp.dtype(cfg.dtype)
    self.c_q = fan_in_param(rngs, d, (d, h, k), ("embed", "heads", "head_dim"), cfg)
    self.c_k = fan_in_param(rngs, d, (d, g, k), ("embed", "kv_heads", "head_dim"), cfg)
    self.c_v = fan_in_param(rngs, d, (d, g, k), ("embed", "kv_heads", "head_dim"), cfg)
    self.c_proj = param(rngs, zeros_init, (h, k, d), ("heads", "head_dim", "embed"), cfg)

  def queries(self, x_BxTxD, rope) -> Queries:
    return FullQueries(apply_rope(self._proj(x_BxTxD, self.c_q, "btd,dhk->bthk"), *rope))

  def entries(self, x_BxTxD, rope):
    return {"k": apply_rope(self._proj(x_BxTxD, self.c_k, "btd,dgk->btgk"), *rope),
            "v": self._proj(x_BxTxD, self.c_v, "btd,dgk->btgk")}

  def attend(self, q: Queries, e, mask: Mask):
    return kernels.attention(self._constrain_q(q.q_BxTxHxK), e["k"], e["v"], mask,
                             scale=1.0 / math.sqrt(self.cfg.head_dim),
                             impl=self.cfg.attention_impl, rules=self.rules)

  def attend_kernel(self, q: Queries, cache: LayerCache, entries: dict) -> jax.Array:
    """One query token (T == 1) by the grouped decode kernel: the H/G query heads of each KV
    head attend together to layer `cache.layer` of the stacked K/V cache, read in place once
    (no K/V repeated to the query heads, no per-layer slice copied)."""
    batch, _, heads, dim = q.q_BxTxHxK.shape
    groups = self.cfg.kv_heads
    q_BxGxJxK = q.q_BxTxHxK[:, 0].reshape(batch, groups, heads // groups, dim)
    y_BxGxJxK = kernels.grouped_decode(
        [q_BxGxJxK], [entries["k"]], cache.layer, cache.pad_B, cache.start,
        kv_len=cache.kv_len, scale=1.0 / math.sqrt(dim), values=entries["v"],
        rules=self.rules, cache_axes=[("layers",) + self.ENTRY_AXES[n] for n in ("k", "v")])
    return y_BxGxJxK.reshape(batch, 1, heads, dim).astype(self.dtype)


class MLA(Attention):
  """Multi-head latent attention (DeepSeek-V2 style, docs/model.md)."""

  ENTRY_AXES = {
      "latent": ("batch", "cache_length", "kv_lora"),
      "k_pe": ("batch", "cache_length", "head_dim"),
  }

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, rules: Rules):
    d, h = cfg.d_model, cfg.num_heads
    n, r, v = cfg.mla_nope_dim, cfg.mla_rope_dim, cfg.mla_v_dim
    ql, kl = cfg.mla_q_lora, cfg.mla_kv_lora
    self.cfg, self.rules = cfg, rules
    self.dtype = jnp.dtype(cfg.dtype)
    self.q_a = fan_in_param(rngs, d, (d, ql), ("embed", "q_lora"), cfg)
    self.q_a_norm = RMSNorm(ql, 1e-6, "q_lora", cfg, rngs)
    # q_b (and kv_a, kv_b) of the reference are stored split by role, same numbers.
    self.q_b_nope = fan_in_param(rngs, ql, (ql, h, n), ("q_lora", "heads", "head_dim"), cfg)
    self.q_b_rope = fan_in_param(rngs, ql, (ql, h, r), ("q_lora", "heads", "head_dim"), cfg)
    self.kv_a_latent = fan_in_param(rngs, d, (d, kl), ("embed", "kv_lora"), cfg)
    self.kv_a_rope = fan_in_param(rngs, d, (d, r), ("embed", "head_dim"), cfg)
    self.kv_a_norm = RMSNorm(kl, 1e-6, "kv_lora", cfg, rngs)
    self.kv_b_nope = fan_in_param(rngs, kl, (kl, h, n), ("kv_lora", "heads", "head_dim"), cfg)
    self.kv_b_v = fan_in_param(rngs, kl, (kl, h, v), ("kv_lora", "heads", "head_dim"), cfg)
    self.c_proj = param(rngs, zeros_init, (h, v, d), ("heads", "head_dim", "embed"), cfg)

  def queries(self, x_BxTxD, rope) -> Queries:
    c_BxTxQl = self.q_a_norm(self._proj(x_BxTxD, self.q_a, "btd,dl->btl"))
    q_nope_BxTxHxN = self._proj(c_BxTxQl, self.q_b_nope, "btl,lhn->bthn")
    q_pe_BxTxHxR = apply_rope(self._proj(c_BxTxQl, self.q_b_rope, "btl,lhr->bthr"), *rope)
    return FullQueries(jnp.concatenate([q_nope_BxTxHxN, q_pe_BxTxHxR], axis=-1))

  def entries(self, x_BxTxD, rope):
    return {"latent": self.kv_a_norm(self._proj(x_BxTxD, self.kv_a_latent, "btd,dl->btl")),
            "k_pe": apply_rope(self._proj(x_BxTxD, self.kv_a_rope, "btd,dr->btr"), *rope)}

  def attend(self, q: Queries, e, mask: Mask):
    k_nope_BxSxHxN = self._proj(e["latent"], self.kv_b_nope, "bsl,lhn->bshn")
    v_BxSxHxV = self._proj(e["latent"], self.kv_b_v, "bsl,lhv->bshv")
    k_pe_BxSxHxR = jnp.broadcast_to(e["k_pe"][:, :, None, :].astype(k_nope_BxSxHxN.dtype),
                                    k_nope_BxSxHxN.shape[:3] + e["k_pe"].shape[-1:])
    k_BxSxHxE = jnp.concatenate([k_nope_BxSxHxN, k_pe_BxSxHxR], axis=-1)
    scale = 1.0 / math.sqrt(self.cfg.mla_nope_dim + self.cfg.mla_rope_dim)
    return kernels.attention(self._constrain_q(q.q_BxTxHxK), k_BxSxHxE, v_BxSxHxV, mask,
                             scale=scale, impl=self.cfg.attention_impl, rules=self.rules)

  def attend_factors(self, q: Queries, e, mask: Mask):
    """`attend` in the latent space (decoding): kv_b is absorbed into the query and the output
    instead of expanding every cached latent to per-head K/V each step.

      logit[t,h,s] = <q_nope[t,h] kv_b_nope[:,h]^T, latent[s]> + <q_pe[t,h], k_pe[s]>
      out[t,h]     = (sum_s alpha[t,h,s] latent[s]) kv_b_v[:,h]
    FLOPs per cached key: h (kv_lora + d_r) + h kv_lora (vs h kv_lora (d_n + d_v) expanding).
    """
    cfg, f32 = self.cfg, jnp.float32
    n = cfg.mla_nope_dim
    q_nope_BxTxHxN, q_pe_BxTxHxR = q.q_BxTxHxK[..., :n], q.q_BxTxHxK[..., n:]
    q_lat_BxTxHxL = self._proj(q_nope_BxTxHxN, self.kv_b_nope, "bthn,lhn->bthl")
    logits_BxTxHxS = (
        jnp.einsum("bthl,bsl->bths", q_lat_BxTxHxL, e["latent"].astype(self.dtype),
                   preferred_element_type=f32)
        + jnp.einsum("bthr,bsr->bths", q_pe_BxTxHxR, e["k_pe"].astype(self.dtype),
                     preferred_element_type=f32)) / math.sqrt(n + cfg.mla_rope_dim)
    keep_BxTxS = mask.keep(logits_BxTxHxS.shape[1], logits_BxTxHxS.shape[3])
    if keep_BxTxS is not None:
      logits_BxTxHxS = jnp.where(keep_BxTxS[:, :, None, :], logits_BxTxHxS, -jnp.inf)
    probs_BxTxHxS = jax.nn.softmax(logits_BxTxHxS, axis=-1)
    ctx_BxTxHxL = jnp.einsum("bths,bsl->bthl", probs_BxTxHxS.astype(self.dtype),
                             e["latent"].astype(self.dtype), preferred_element_type=f32)
    return self._proj(ctx_BxTxHxL, self.kv_b_v, "bthl,lhv->bthv")

  def attend_kernel(self, q: Queries, cache: LayerCache, entries: dict) -> jax.Array:
    """`attend_factors` for one query token (T == 1) by the grouped decode kernel: all heads
    share one group (the latent is their common key and value), so each latent block is read
    once for both the logits and the context, in place in the stacked cache."""
    cfg = self.cfg
    n = cfg.mla_nope_dim
    q_BxHxE = q.q_BxTxHxK[:, 0]
    q_lat_BxHxL = self._proj(q_BxHxE[..., :n], self.kv_b_nope, "bhn,lhn->bhl")
    shared = lambda x: x[:, :, :, None, :]  # (layers, B, S, 1, D): one KV group
    axes = [("layers",) + self.ENTRY_AXES[name][:2] + (None,) + self.ENTRY_AXES[name][2:]
            for name in ("latent", "k_pe")]
    ctx_Bx1xHxL = kernels.grouped_decode(
        [q_lat_BxHxL[:, None], q_BxHxE[:, None, :, n:]],
        [shared(entries["latent"]), shared(entries["k_pe"])], cache.layer, cache.pad_B,
        cache.start, kv_len=cache.kv_len, scale=1.0 / math.sqrt(n + cfg.mla_rope_dim),
        value_key=0, rules=self.rules, cache_axes=axes)
    return self._proj(ctx_Bx1xHxL, self.kv_b_v, "bthl,lhv->bthv")


def make_attention(cfg: ModelConfig, rngs: nnx.Rngs, rules: Rules) -> Attention:
  if cfg.attention in ("tpa", "tpa_kvonly"):
    return TPA(cfg, rngs, rules)
  if cfg.attention in ("mha", "mqa", "gqa"):
    return GQA(cfg, rngs, rules)
  if cfg.attention == "mla":
    return MLA(cfg, rngs, rules)
  raise ValueError(f"unknown attention type {cfg.attention!r}")
