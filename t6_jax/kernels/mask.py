"""Which keys each query may see: one description for every attention path and kernel.

A `Mask` keeps its parts separate (causal flag with a query offset, segment ids, an explicit
keep array) so that fused kernels can take them as they are (causal + segment ids), and
`keep_BxTxS` turns them into one boolean array for the paths that need it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Mask:
  """causal: key position s is hidden from query t when s > q_start + t.
  q_start: key position of the first query (int32 scalar); None means 0 with queries and keys
    the same positions (training, a whole prefill), which fused causal kernels take directly.
  segment_ids_BxT / kv_segment_ids_BxS: a query sees only keys of its own segment (packed
    documents); kv_segment_ids_BxS defaults to segment_ids_BxT (queries are the keys).
  keep_BxTxS: an extra boolean array ANDed in (valid cache slots of left-padded prompts).
  """

  causal: bool = True
  q_start: jax.Array | None = None
  segment_ids_BxT: jax.Array | None = None
  kv_segment_ids_BxS: jax.Array | None = None
  keep_BxTxS: jax.Array | None = None

  @property
  def aligned_causal(self) -> bool:
    """Causal with queries at key positions 0..T-1: what `is_causal` of fused kernels means."""
    return self.causal and self.q_start is None

  def keep(self, t_len: int, s_len: int, *, include_causal: bool = True):
    """The parts ANDed into one boolean (B or 1, T, S) (the causal part only with
    `include_causal`), or None when nothing is masked."""
    keep = None
    if include_causal and self.causal:
      start = 0 if self.q_start is None else self.q_start
      q_T = start + jnp.arange(t_len, dtype=jnp.int32)
      keep = (jnp.arange(s_len, dtype=jnp.int32)[None, :] <= q_T[:, None])[None]
    if self.segment_ids_BxT is not None:
      kv_BxS = (self.segment_ids_BxT if self.kv_segment_ids_BxS is None
                else self.kv_segment_ids_BxS)
      same = self.segment_ids_BxT[:, :, None] == kv_BxS[:, None, :]
      keep = same if keep is None else keep & same
    if self.keep_BxTxS is not None:
      keep = self.keep_BxTxS if keep is None else keep & self.keep_BxTxS
    return keep


jax.tree_util.register_dataclass(
    Mask, data_fields=["q_start", "segment_ids_BxT", "kv_segment_ids_BxS", "keep_BxTxS"],
    meta_fields=["causal"])


def training_mask(segment_ids_BxT: jax.Array | None = None) -> Mask:
  """Causal over one sequence per row; packed documents kept apart by their segment ids."""
  return Mask(causal=True, segment_ids_BxT=segment_ids_BxT)


def cache_mask(start: jax.Array, t_len: int, kv_len: int, pad_B: jax.Array) -> Mask:
  """T new tokens at cache slots start .. start+T-1 against slots [0, kv_len): causal, and
  row b's first pad_B[b] slots (left padding) hidden, except a slot from itself (so padding
  rows keep a finite softmax)."""
  slot_T = start + jnp.arange(t_len, dtype=jnp.int32)
  s_S = jnp.arange(kv_len, dtype=jnp.int32)
  keep_BxTxS = ((s_S[None, None, :] >= pad_B[:, None, None])
                | (s_S[None, None, :] == slot_T[None, :, None]))
  return Mask(causal=True, q_start=jnp.asarray(start, jnp.int32), keep_BxTxS=keep_BxTxS)
