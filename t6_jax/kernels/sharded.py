"""The attention kernels under `jax.shard_map`: batch over the data-parallel mesh axes, heads
over the tensor axis.

A Pallas kernel is one opaque custom call that XLA's partitioner cannot split, so on a mesh of
more than one device it has to run per shard. Attention is independent per (row, head), so the
split needs no communication at all:

  * splash (training / prefill): q split by batch and heads; K/V split the same way when the
    tensor size divides the KV heads, else (MQA, or fewer KV heads than tensor shards) K/V are
    replicated over tensor and each shard slices out the one KV head its query heads use.
  * TPA decode: A factors carry heads (split over tensor), B factors are shared by all heads
    (replicated over tensor), the query is split by heads. Each shard's output heads depend only
    on its own query heads and A columns plus the shared B rows, so the (B, H, d_h) output is
    split by heads exactly as the query, with no cross-shard combine.
  * grouped decode (MHA/MQA/GQA/MLA): the cache and the queries split by KV heads where the
    cache is, else each KV head's query heads split over tensor against the whole
    (replicated) K/V of the shard's rows; a query head needs only its own KV head's cache, so
    the output splits as the queries, again with no combine.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from t6_jax.kernels.splash_tpu import splash_attention


def _axes(mesh, names) -> tuple[str, ...]:
  names = () if names is None else ((names,) if isinstance(names, str) else tuple(names))
  for n in names:
    if n not in mesh.shape:
      raise ValueError(f"mesh axis {n!r} is not in the mesh {dict(mesh.shape)}; name axes of "
                       f"the mesh")
  return names


def _size(mesh, names: tuple[str, ...]) -> int:
  return math.prod(mesh.shape[n] for n in names)


def _check_split(what: str, n: int, parts: int, axes):
  if n % parts:
    raise ValueError(f"{what} ({n}) does not divide over the mesh axes {axes} ({parts} shards); "
                     f"choose a size divisible by {parts} or a smaller mesh")


def splash_attention_sharded(q_BxTxHxK, k_BxSxGxK, v_BxSxGxV, *, mesh, batch_axes,
                             head_axis, scale: float, causal: bool = True,
                             segment_ids_BxT=None, interpret: bool = False, block_sizes=None):
  """`splash_attention` run per shard: batch over `batch_axes`, heads over `head_axis`.

  batch_axes: mesh axis name or names that split the batch (e.g. ("data", "fsdp"));
  head_axis: the tensor axis name (None: heads are not split). The sequence is not split.
  """
  batch_axes, head_axes = _axes(mesh, batch_axes), _axes(mesh, head_axis)
  batch, _, heads, _ = q_BxTxHxK.shape
  kv_heads = k_BxSxGxK.shape[2]
  tp = _size(mesh, head_axes)
  _check_split("batch", batch, _size(mesh, batch_axes), batch_axes)
  _check_split("query heads", heads, tp, head_axes)
  bspec = batch_axes if batch_axes else None
  hspec = head_axes if head_axes else None
  q_spec = P(bspec, None, hspec, None)
  group = heads // kv_heads  # query heads per KV head
  local_heads = heads // tp
  if kv_heads % tp == 0:
    kv_spec, pick_kv = q_spec, None
  elif group % local_heads == 0:
    # Each shard's query heads all read one KV head: replicate K/V over tensor, slice it here.
    kv_spec = P(bspec, None, None, None)
    pick_kv = lambda x: jax.lax.dynamic_slice_in_dim(
        x, jax.lax.axis_index(head_axes) * local_heads // group, 1, axis=2)
  else:
    raise ValueError(f"{kv_heads} KV heads cannot be split over {tp} tensor shards of "
                     f"{local_heads} query heads each; use a KV head count divisible by the "
                     f"tensor size, or a tensor size whose shards fall inside one KV group")
  seg_spec = P(bspec, None)
  run = functools.partial(splash_attention, scale=scale, causal=causal, interpret=interpret,
                          block_sizes=block_sizes)

  def local(q, k, v, seg):
    if pick_kv is not None:
      k, v = pick_kv(k), pick_kv(v)
    return run(q, k, v, segment_ids_BxT=seg)

  in_specs = (q_spec, kv_spec, kv_spec, None if segment_ids_BxT is None else seg_spec)
  # jit: eager callers get their arguments resharded to the specs (inside a jit it is a no-op).
  return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=q_spec,
                               check_vma=False))(q_BxTxHxK, k_BxSxGxK, v_BxSxGxV, segment_ids_BxT)


def tpa_decode_sharded(kernel_fn, mesh, batch_axes, head_axis, q_BxHxK, a_k, b_k, a_v, b_v,
                       layer, pad_B, pos, *, kv_len: int, **kernel_kwargs):
  """A TPA decode kernel (`tpa_decode_attention` on GPU or `tpa_decode_attention_tpu`, same
  signature) run per shard of the stacked factor cache.

  Cache factors are (layers, B, S, H, R) / (layers, B, S, R, d_h), or for the TPU kernel A in
  its layout `tpu_a_layout(a, shards=tensor size)` (layers, B, rows, S), whose rows hold each
  tensor shard's heads (padded) in turn, and B flat (layers, B, S, R*d_h). Returns fp32
  (B, H, d_h), split by batch and heads.
  """
  batch_axes, head_axes = _axes(mesh, batch_axes), _axes(mesh, head_axis)
  batch, heads, _ = q_BxHxK.shape
  _check_split("batch", batch, _size(mesh, batch_axes), batch_axes)
  _check_split("query heads", heads, _size(mesh, head_axes), head_axes)
  bspec = batch_axes if batch_axes else None
  hspec = head_axes if head_axes else None
  a_spec = lambda x: (P(None, bspec, None, hspec, None) if x.ndim == 5
                      else P(None, bspec, hspec, None))
  b_spec = lambda x: P(None, bspec, *([None] * (x.ndim - 2)))
  q_spec = P(bspec, hspec, None)
  in_specs = (q_spec, a_spec(a_k), b_spec(b_k), a_spec(a_v), b_spec(b_v), P(), P(bspec), P())
  local = lambda q, ak, bk, av, bv, layer, pad, pos: kernel_fn(
      q, ak, bk, av, bv, layer, pad, pos, kv_len=kv_len, **kernel_kwargs)
  return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=q_spec,
                               check_vma=False))(q_BxHxK, a_k, b_k, a_v, b_v,
                                                jnp.asarray(layer, jnp.int32),
                                                pad_B.astype(jnp.int32),
                                                jnp.asarray(pos, jnp.int32))


def grouped_decode_sharded(kernel_fn, mesh, batch_axes, group_axis, head_axis, queries, keys,
                           layer, pad_B, pos, *, kv_len: int, values=None, value_key=None,
                           **kernel_kwargs):
  """The grouped decode kernel (`grouped_decode_attention`, same operands) run per shard of
  the stacked cache: rows over `batch_axes`, the G KV heads over `group_axis` (queries
  (B, G, J, D) and caches (layers, B, S, G, D) alike), or, with `head_axis`, each KV head's J
  query heads (the caches then whole over it). At most one of group_axis and head_axis.
  Returns fp32 (B, G, J, D_v), split as the queries.
  """
  batch_axes, group_axes = _axes(mesh, batch_axes), _axes(mesh, group_axis)
  head_axes = _axes(mesh, head_axis)
  if group_axes and head_axes:
    raise ValueError(f"split the KV heads ({group_axes}) or their query heads ({head_axes}), "
                     f"not both")
  batch, groups, group = queries[0].shape[:3]
  _check_split("batch", batch, _size(mesh, batch_axes), batch_axes)
  _check_split("KV heads", groups, _size(mesh, group_axes), group_axes)
  _check_split("query heads per KV head", group, _size(mesh, head_axes), head_axes)
  spec = lambda axes: axes if axes else None
  bspec = spec(batch_axes)
  q_spec = P(bspec, spec(group_axes), spec(head_axes), None)
  cache_spec = P(None, bspec, None, spec(group_axes), None)
  caches = list(keys) + ([] if values is None else [values])
  n_keys = len(keys)

  def local(qs, caches, layer, pad, pos):
    vals = caches[n_keys] if values is not None else None
    return kernel_fn(qs, caches[:n_keys], layer, pad, pos, kv_len=kv_len, values=vals,
                     value_key=value_key, **kernel_kwargs)

  in_specs = ([q_spec] * len(queries), [cache_spec] * len(caches), P(), P(bspec), P())
  return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=q_spec,
                               check_vma=False))(list(queries), caches,
                                                jnp.asarray(layer, jnp.int32),
                                                pad_B.astype(jnp.int32),
                                                jnp.asarray(pos, jnp.int32))
