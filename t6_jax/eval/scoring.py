"""Log-likelihood of continuations given contexts, batched into a handful of compiled shapes.

A request is a pair of token lists (context, continuation). As in lm-evaluation-harness, the
model reads context + continuation (left-truncated to `max_len + 1` tokens, minus the last
token) and the log-probabilities of the continuation's tokens are summed; `is_greedy` says
whether argmax decoding would have produced the continuation.

Rows are right-padded (causal attention keeps padding out of every scored position) to the
smallest bucket length that fits, and every forward has `rows` rows, so the number of
compiled programs is the number of buckets (powers of two up to `max_len`), not the number of
distinct lengths. The batch axis is split over the mesh's data axes like training batches.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from t6_jax.config import Config
from t6_jax.model import model_from_params, shard_params  # noqa: F401  (eval imports it here)
from t6_jax.sharding import batch_devices, put_batch

Pair = tuple[Sequence[int], Sequence[int]]


def bucket_lengths(max_len: int, min_len: int = 16) -> list[int]:
  """Powers of two from `min_len`, capped by (and always including) `max_len`."""
  lengths, n = [], min(min_len, max_len)
  while n < max_len:
    lengths.append(n)
    n *= 2
  return lengths + [max_len]


def batch_shards(cfg: Config, mesh) -> int:
  """How many ways a batch is split: the product of the rules' batch axes."""
  return batch_devices(mesh, cfg.mesh.rules)


@contextlib.contextmanager
def mesh_context(mesh):
  """The mesh the model's sharding constraints read while tracing (nothing without one)."""
  with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
    yield


def token_logprobs(cfg: Config, params, tokens_BxT, targets_BxT, positions_BxT=None,
                   segment_ids_BxT=None):
  """Per-position log p(target) and whether it is the argmax; targets < 0 are ignored (0)."""
  model = model_from_params(cfg.model, params, cfg.mesh.rules)
  logits_BxTxV = model(tokens_BxT, positions_BxT, segment_ids_BxT).astype(jnp.float32)
  keep_BxT = targets_BxT >= 0
  safe_BxT = jnp.where(keep_BxT, targets_BxT, 0)
  # log p = logit - logsumexp: no second (B, T, V) array for a full log-softmax.
  target_logit_BxT = jnp.take_along_axis(logits_BxTxV, safe_BxT[..., None], axis=-1)[..., 0]
  lp_BxT = target_logit_BxT - jax.nn.logsumexp(logits_BxTxV, axis=-1)
  greedy_BxT = jnp.argmax(logits_BxTxV, axis=-1) == safe_BxT
  return jnp.where(keep_BxT, lp_BxT, 0.0), greedy_BxT | ~keep_BxT


@functools.lru_cache(maxsize=16)
def _score_fn(cfg: Config, mesh):
  """One jitted scoring function per (config, mesh), so scorers share compiled programs."""
  replicated = None if mesh is None else NamedSharding(mesh, P())

  def score(params, tokens_BxT, targets_BxT):
    lp_BxT, greedy_BxT = token_logprobs(cfg, params, tokens_BxT, targets_BxT)
    return lp_BxT.sum(-1), greedy_BxT.all(-1)

  return jax.jit(score, out_shardings=replicated)


class Scorer:
  """Sums of continuation log-probabilities for many (context, continuation) token pairs."""

  def __init__(self, cfg: Config, params, *, mesh=None, rows: int | None = None,
               max_len: int | None = None, min_bucket: int = 16, progress: bool = False):
    self.cfg, self.mesh, self.progress = cfg, mesh, progress
    self.max_len = max_len or cfg.eval.max_len or cfg.model.max_seq_len
    if self.max_len > cfg.model.max_seq_len:
      raise ValueError(f"scoring length {self.max_len} exceeds model.max_seq_len="
                       f"{cfg.model.max_seq_len}; lower eval.max_len")
    shards = batch_shards(cfg, mesh)
    rows = rows or cfg.eval.mc_batch_size
    self.rows = -(-rows // shards) * shards  # a multiple of the data-parallel devices
    self.buckets = bucket_lengths(self.max_len, min_bucket)
    self.params = shard_params(params, cfg.model, mesh, cfg.mesh.rules)
    self._score = _score_fn(cfg, mesh)
    self._shapes: set[tuple[int, int]] = set()

  def compiled_shapes(self) -> int:
    """How many (rows, length) shapes this scorer has run (one compiled program each)."""
    return len(self._shapes)

  def loglikelihood(self, pairs: Sequence[Pair]) -> list[tuple[float, bool]]:
    """(sum of log p(continuation tokens), continuation is the greedy decode) per pair."""
    rows = []
    out: list[tuple[float, bool] | None] = [None] * len(pairs)
    for i, (context, continuation) in enumerate(pairs):
      if len(continuation) == 0:
        out[i] = (0.0, True)  # the empty sum, as the harness's own models give
        continue
      if len(context) == 0:
        raise ValueError(f"request {i} has an empty context; start it with the end-of-text "
                         f"token as lm-evaluation-harness does")
      full = list(context) + list(continuation)
      full = full[-(self.max_len + 1):]
      n_cont = min(len(continuation), len(full) - 1)
      rows.append((i, full, n_cont))
    # Longest first, so each batch's rows have similar lengths and few padded positions.
    rows.sort(key=lambda r: -len(r[1]))
    batches = [rows[s:s + self.rows] for s in range(0, len(rows), self.rows)]
    if self.progress and batches:
      from tqdm import tqdm
      batches = tqdm(batches, desc="scoring", unit="batch", leave=False)

    def collect(batch, lp, greedy):
      lp, greedy = np.asarray(lp), np.asarray(greedy)
      for r, (i, _, _) in enumerate(batch):
        out[i] = (float(lp[r]), bool(greedy[r]))

    pending = None
    with mesh_context(self.mesh):
      for batch in batches:
        length = next(b for b in self.buckets if b >= len(batch[0][1]) - 1)
        tokens = np.zeros((self.rows, length), np.int32)
        targets = np.full((self.rows, length), -1, np.int32)
        for r, (_, full, n_cont) in enumerate(batch):
          n = len(full) - 1
          tokens[r, :n] = full[:-1]
          targets[r, n - n_cont:n] = full[n - n_cont + 1:]
        self._shapes.add(tokens.shape)
        tokens, targets = put_batch((tokens, targets), self.mesh, self.cfg.mesh.rules,
                                    same_on_every_process=True)
        result = self._score(self.params, tokens, targets)
        if pending is not None:  # read the previous batch while this one runs
          collect(*pending)
        pending = (batch, *result)
    if pending is not None:
      collect(*pending)
    return out


def rolling_windows(tokens: Sequence[int], prefix_token: int, max_len: int) -> list[Pair]:
  """(context, continuation) pairs that score every token of `tokens` exactly once.

  The first window is conditioned on `prefix_token`; later windows keep as much preceding
  text as fits in `max_len` (lm-evaluation-harness's rolling log-likelihood).
  """
  seq = [prefix_token] + list(tokens)
  pairs = []
  for start in range(0, len(tokens), max_len):
    end = min(start + max_len, len(tokens))  # predict seq[start+1 : end+1]
    first = max(0, end - max_len)
    pairs.append((seq[first:start + 1], seq[start + 1:end + 1]))
  return pairs


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
  """Token ids of (context, continuation), split the way lm-evaluation-harness splits them.

  Trailing whitespace of the context moves to the continuation; the continuation's ids are
  the tail of the encoding of the whole text (so a merge across the boundary is kept); an
  empty context becomes the end-of-text token.
  """
  n_spaces = len(context) - len(context.rstrip())
  if n_spaces:
    context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
  if not context:
    return [tokenizer.eot_id], list(tokenizer.encode(continuation))
  whole = list(tokenizer.encode(context + continuation))
  context_ids = list(tokenizer.encode(context))
  return context_ids, whole[len(context_ids):]


class TextScorer:
  """`Scorer` on strings: log-likelihood of text continuations and of whole texts."""

  def __init__(self, scorer: Scorer, tokenizer):
    self.scorer, self.tokenizer = scorer, tokenizer

  def loglikelihood(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
    return self.scorer.loglikelihood([encode_pair(self.tokenizer, c, x) for c, x in pairs])

  def loglikelihood_rolling(self, texts: Sequence[str]) -> list[float]:
    """log p(text | end-of-text) of each whole text, in windows of the scoring length."""
    pairs, owner = [], []
    for i, text in enumerate(texts):
      windows = rolling_windows(self.tokenizer.encode(text), self.tokenizer.eot_id,
                                self.scorer.max_len)
      pairs += windows
      owner += [i] * len(windows)
    totals = [0.0] * len(texts)
    for i, (lp, _) in zip(owner, self.scorer.loglikelihood(pairs)):
      totals[i] += lp
    return totals


def evaluate_tasks(cfg: Config, params, tokenizer, task_data, *, mesh=None,
                   progress: bool = False) -> list[dict]:
  """Each task's results (tasks.evaluate_task) for these params, with the eval.* settings
  (num_fewshot, fewshot_seed, limit); the scoring programs are compiled once per config and
  mesh, so repeated calls (each validation of a training run) reuse them."""
  from t6_jax.eval import tasks
  scorer = TextScorer(Scorer(cfg, params, mesh=mesh, progress=progress), tokenizer)
  e = cfg.eval
  return [tasks.evaluate_task(data, scorer.loglikelihood, num_fewshot=e.num_fewshot,
                              seed=e.fewshot_seed, limit=e.limit) for data in task_data]
