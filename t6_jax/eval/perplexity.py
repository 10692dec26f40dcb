"""Validation loss, perplexity and bits per byte over a held-out split.

loss = (sum of -log p(target) in nats) / (number of scored tokens); perplexity = exp(loss);
bits per byte = (sum of -log p in bits) / (UTF-8 bytes of the decoded scored tokens), which
compares models with different tokenizers. Batches come from the data pipeline (any source)
and are split over the mesh like training batches; the sums are global, so every process
gets the same numbers.
"""

from __future__ import annotations

import functools
import math
import time

import grain
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from t6_jax.config import Config
from t6_jax.eval.scoring import mesh_context, shard_params, token_logprobs
from t6_jax.sharding import put_batch


BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids")


def count_bytes(targets: np.ndarray, tokenizer) -> int:
  """UTF-8 bytes of the text of each row's scored targets (ids < 0 are ignored)."""
  total = 0
  for row in np.asarray(targets):
    ids = row[row >= 0].tolist()
    if ids:
      total += len(tokenizer.decode(ids).encode("utf-8"))
  return total


def _pad_rows(batch: dict, rows: int) -> dict:
  """A short last batch padded with ignored rows, so every step has the compiled shape."""
  have = next(iter(batch.values())).shape[0]
  if have == rows:
    return batch
  out = {}
  for key, x in batch.items():
    fill = -1 if key == "targets" else 0
    pad = np.full((rows - have,) + x.shape[1:], fill, x.dtype)
    out[key] = np.concatenate([x, pad])
  return out


@functools.lru_cache(maxsize=8)
def make_loss_fn(cfg: Config, mesh):
  """Jitted (params, batch) -> (sum of -log p, scored tokens), replicated on every device."""
  replicated = None if mesh is None else NamedSharding(mesh, P())

  def loss_sums(params, batch):
    lp_BxT, _ = token_logprobs(cfg, params, batch["inputs"], batch["targets"],
                               batch.get("positions"), batch.get("segment_ids"))
    return -lp_BxT.sum(), (batch["targets"] >= 0).sum()

  return jax.jit(loss_sums, out_shardings=replicated)


def batch_count(ds) -> int | None:
  """How many batches one pass over `ds` gives, when it is known without reading it: a
  batched random-access dataset read in order (the flat token sources with concat packing).
  Streamed documents are packed as they come, so their count is not known in advance."""
  parents = getattr(ds, "parents", ())
  if len(parents) == 1 and isinstance(parents[0], grain.MapDataset):
    try:
      return len(parents[0])
    except TypeError:  # an infinite (repeated) dataset
      return None
  return None


def evaluate_perplexity(cfg: Config, params, tokenizer, *, mesh=None, split: str = "validation",
                        batch_size: int | None = None, seq_len: int | None = None,
                        max_batches: int | None = None, progress: bool = True) -> dict:
  """Loss, perplexity and bits per byte of `params` on `split` of the configured data.

  batch_size is global (sequences per step over all processes); it is rounded up to a
  multiple of the data-parallel devices. max_batches=0 reads the whole split once.
  """
  from t6_jax import data as data_lib
  from t6_jax.eval.scoring import batch_shards

  batch_size = batch_size or cfg.eval.batch_size
  seq_len = seq_len or cfg.eval.seq_len or cfg.train.seq_len
  max_batches = cfg.eval.max_batches if max_batches is None else max_batches
  if seq_len > cfg.model.max_seq_len:
    raise ValueError(f"evaluation window {seq_len} exceeds model.max_seq_len="
                     f"{cfg.model.max_seq_len}; lower eval.seq_len")
  shards = batch_shards(cfg, mesh)
  batch_size = -(-batch_size // shards) * shards
  if batch_size % jax.process_count():
    raise ValueError(f"eval batch {batch_size} does not split over {jax.process_count()} "
                     f"processes; make eval.batch_size a multiple of it")
  local_rows = batch_size // jax.process_count()
  ds = data_lib.make_dataset(cfg, split, batch_size=local_rows, seq_len=seq_len,
                             shuffle=False, num_epochs=1)
  params = shard_params(params, cfg.model, mesh, cfg.mesh.rules)
  loss_sums = make_loss_fn(cfg, mesh)

  nll, tokens, local_bytes, steps = 0.0, 0, 0, 0
  pending = []
  start = time.perf_counter()
  bar = None
  if progress and jax.process_index() == 0:
    from tqdm import tqdm
    known = batch_count(ds)
    total = min(filter(None, (max_batches, known)), default=None)
    bar = tqdm(total=total, desc=f"{split} loss", unit="batch")
  with mesh_context(mesh):
    for batch in ds:
      if max_batches and steps >= max_batches:
        break
      batch = _pad_rows({k: np.asarray(batch[k]) for k in BATCH_KEYS if k in batch},
                        local_rows)
      local_bytes += count_bytes(batch["targets"], tokenizer)
      device_batch = put_batch(batch, mesh, cfg.mesh.rules)
      pending.append(loss_sums(params, device_batch))  # dispatched; read later
      if len(pending) > 2:
        s, n = pending.pop(0)
        nll, tokens = nll + float(s), tokens + int(n)
      steps += 1
      if bar is not None:
        bar.update(1)
  for s, n in pending:
    nll, tokens = nll + float(s), tokens + int(n)
  if bar is not None:
    bar.close()
  if tokens == 0:
    raise ValueError(f"the {split} split gave no tokens to score; check data.eval_split and "
                     f"the data source")
  total_bytes = local_bytes
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    total_bytes = int(np.sum(multihost_utils.process_allgather(np.int64(local_bytes))))
  loss = nll / tokens
  return {"split": split, "loss": loss, "perplexity": math.exp(min(loss, 700.0)),
          "bits_per_byte": nll / math.log(2) / total_bytes, "tokens": tokens,
          "bytes": total_bytes, "bytes_per_token": total_bytes / tokens, "batches": steps,
          "seq_len": seq_len, "batch_size": batch_size,
          "seconds": time.perf_counter() - start}
