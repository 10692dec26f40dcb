"""The Grain input pipeline: shuffle, per-process shard, tokenize, pack, batch, global arrays.

Every document is `<|endoftext|>` followed by its tokens. Two packings:
- `concat` (the reference's): the documents form one stream cut into windows of T + 1 tokens
  that overlap by one token, inputs = window[:-1], targets = window[1:], so every token of the
  stream is a target exactly once (the tail shorter than a window is dropped). Flat token
  sources (reference shards, the cached bundled corpus) read windows at random, shuffled
  globally; document sources stream their shuffled documents through `ConcatWindows`.
- `segments`: documents are cut into pieces of at most T + 1 tokens (overlapping by one, as
  above) and first-fit packed into rows with `segment_ids` (1, 2, ...; 0 = padding) and
  `positions` restarting at 0 in every piece; padding has target -1, so attention and loss
  never cross documents.

Order: source -> shuffle(seed) -> repeat(epochs) -> this process's slice -> tokenize -> pack ->
batch -> worker processes. The slice is taken before any many-to-one step, so processes read
disjoint data; every step is a Grain dataset whose iterator state round-trips through
get_state/set_state, which makes the whole iterator checkpointable.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import grain
import numpy as np

from t6_jax.data import corpus
from t6_jax.data import mixture
from t6_jax.data import sources as src
from t6_jax.data.tokenizers import Tokenizer, build_tokenizer


# --------------------------------------------------------------------------------------------
# Concat windows


class _Windows:
  """Random access to the T+1 windows (stride T) of flat token streams; none crosses files."""

  def __init__(self, tokens: src.FlatTokens, seq_len: int):
    self.tokens, self.seq_len = tokens, seq_len
    counts = [max(0, (n - 1) // seq_len) for n in tokens.lengths()]
    self.starts = np.cumsum([0] + counts)

  def __len__(self) -> int:
    return int(self.starts[-1])

  def __getitem__(self, i: int) -> np.ndarray:
    f = int(np.searchsorted(self.starts, i, side="right")) - 1
    k = (i - int(self.starts[f])) * self.seq_len
    return np.asarray(self.tokens.arrays[f][k:k + self.seq_len + 1])


def _concat_batch(windows) -> dict[str, np.ndarray]:
  w_BxT1 = np.stack(windows).astype(np.int32)
  return {"inputs": w_BxT1[:, :-1], "targets": w_BxT1[:, 1:]}


class ConcatWindows(grain.IterDataset):
  """Streams documents (token arrays) into windows of `window` tokens, consecutive windows
  sharing one token. State: the parent's state before the current document and the offset of
  the next window's first token in it."""

  def __init__(self, parent: grain.IterDataset, window: int):
    super().__init__(parent)
    self._window = window

  def __iter__(self):
    return _ConcatWindowsIterator(self._parent.__iter__(), self._window)

  def __str__(self) -> str:
    return f"ConcatWindows(window={self._window})"


class _ConcatWindowsIterator(grain.DatasetIterator):

  def __init__(self, parent, window: int):
    super().__init__(parent)
    self._window = window
    self._doc = None  # the document holding the next window's first token
    self._doc_state = None  # parent state before that document
    self._off = 0  # offset of the next window's first token (in _doc, or in the next doc)

  def __next__(self) -> np.ndarray:
    need, pieces = self._window, []
    while True:
      if self._doc is None:
        self._doc_state = self._parent.get_state()
        self._doc = np.asarray(next(self._parent))
      take = min(need, len(self._doc) - self._off)
      pieces.append(self._doc[self._off:self._off + take])
      need -= take
      if need == 0:
        self._off += take - 1  # the next window starts at this window's last token
        return np.concatenate(pieces)
      self._doc, self._off = None, 0

  def get_state(self) -> dict[str, Any]:
    if self._doc is None:
      return {"parent": self._parent.get_state(), "offset": self._off}
    return {"parent": self._doc_state, "offset": self._off}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._doc, self._off = None, state["offset"]


class ShuffleWindows(grain.IterDataset):
  """Shuffles consecutive windows of `size` elements (numpy permutation seeded by seed and the
  window's index; Grain's WindowShuffleIterDataset is ~10 ms per element on small windows).
  State: the parent's state at the window's start, the window index and the position in it."""

  def __init__(self, parent: grain.IterDataset, size: int, seed: int):
    super().__init__(parent)
    self._size, self._seed = size, seed

  def __iter__(self):
    return _ShuffleWindowsIterator(self._parent.__iter__(), self._size, self._seed)


class _ShuffleWindowsIterator(grain.DatasetIterator):

  def __init__(self, parent, size: int, seed: int):
    super().__init__(parent)
    self._size, self._seed = size, seed
    self._start_state, self._index, self._pos, self._window = parent.get_state(), 0, 0, None

  def _fill(self):
    self._window = []
    for _ in range(self._size):
      try:
        self._window.append(next(self._parent))
      except StopIteration:
        break
    order = np.random.default_rng([self._seed, self._index]).permutation(len(self._window))
    self._window = [self._window[i] for i in order]

  def __next__(self):
    if self._window is None:
      self._fill()
    if self._pos == len(self._window):
      if len(self._window) < self._size:
        raise StopIteration
      self._start_state, self._index, self._pos = self._parent.get_state(), self._index + 1, 0
      self._fill()
      if not self._window:
        raise StopIteration
    self._pos += 1
    return self._window[self._pos - 1]

  def get_state(self) -> dict[str, Any]:
    return {"parent": self._start_state, "index": self._index, "pos": self._pos}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._start_state, self._index, self._pos = state["parent"], state["index"], state["pos"]
    self._window = None


# --------------------------------------------------------------------------------------------
# Segment packing


class _Pieces(grain.experimental.FlatMapTransform):
  """A document -> pieces of at most T+1 tokens overlapping by one, as input/target pairs."""

  max_fan_out = 1 << 30

  def __init__(self, seq_len: int):
    self.seq_len = seq_len

  def flat_map(self, doc):
    doc = np.asarray(doc, dtype=np.int32)
    pieces = []
    for s in range(0, len(doc) - 1, self.seq_len):
      e = min(s + self.seq_len, len(doc) - 1)
      pieces.append({"inputs": doc[s:e], "targets": doc[s + 1:e + 1]})
    return pieces


def _segments_row(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {"inputs": row["inputs"], "targets": row["targets"],
          "segment_ids": row["inputs_segment_ids"], "positions": row["inputs_positions"]}


def _stack(rows) -> dict[str, np.ndarray]:
  return {k: np.stack([r[k] for r in rows]).astype(np.int32) for k in rows[0]}


# --------------------------------------------------------------------------------------------
# Building datasets


class _Tokenize:
  """Text -> int32 [eot, tokens...]; pickles as the tokenizer's spec."""

  def __init__(self, tokenizer: Tokenizer):
    self.tokenizer = tokenizer

  def __call__(self, text: str) -> np.ndarray:
    return np.asarray([self.tokenizer.eot_id, *self.tokenizer.encode(text)], dtype=np.int32)


class _PrependEot:

  def __init__(self, eot_id: int):
    self.eot_id = eot_id

  def __call__(self, tokens: np.ndarray) -> np.ndarray:
    return np.concatenate([np.asarray([self.eot_id], np.int32), np.asarray(tokens, np.int32)])


def _order(ds: grain.MapDataset, *, seed: int, shuffle: bool, num_epochs: int | None,
           process_index: int, process_count: int) -> grain.MapDataset:
  """Shuffle (reshuffled every epoch), repeat, and this process's disjoint slice. With a finite
  number of epochs every process gets the same count (the remainder is dropped)."""
  if len(ds) == 0:
    raise src.DataError(f"the dataset is empty: {ds}")
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs)
  if num_epochs is not None:
    ds = ds[:len(ds) // process_count * process_count]
  return ds[process_index::process_count]


def _windows(tokens: src.FlatTokens, seq_len: int) -> _Windows:
  windows = _Windows(tokens, seq_len)
  if len(windows) == 0:
    raise src.DataError(f"{tokens.name or 'the token source'} has {sum(tokens.lengths())} "
                        f"tokens, fewer than one window of seq_len + 1 = {seq_len + 1}")
  return windows


def window_batches(tokens: src.FlatTokens, *, batch_size: int, seq_len: int, seed: int = 0,
                   shuffle: bool = True, num_epochs: int | None = None, process_index: int = 0,
                   process_count: int = 1) -> grain.MapDataset:
  """`concat` batches from flat token streams, windows shuffled globally."""
  ds = _order(grain.MapDataset.source(_windows(tokens, seq_len)), seed=seed, shuffle=shuffle,
              num_epochs=num_epochs, process_index=process_index, process_count=process_count)
  return ds.batch(batch_size, drop_remainder=True, batch_fn=_concat_batch)


def document_rows(docs: grain.MapDataset, *, packing: str, seq_len: int, seed: int = 0,
                  shuffle: bool = True, shuffle_buffer: int = 0, num_epochs: int | None = None,
                  process_index: int = 0, process_count: int = 1,
                  to_tokens: Callable | None = None, read_threads: int = 2) -> grain.IterDataset:
  """Rows from documents, before batching: windows of T + 1 tokens (concat) or pieces of at
  most T + 1 (segments). `to_tokens` turns a document into int32 [eot, tokens...] (it runs
  after sharding, so each process tokenizes only its own documents)."""
  ds = _order(docs, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
              process_index=process_index, process_count=process_count)
  if to_tokens is not None:
    ds = ds.map(to_tokens)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=16))
  if packing == "concat":
    it = ConcatWindows(it, seq_len + 1)
  else:
    it = grain.experimental.FlatMapIterDataset(it, _Pieces(seq_len))
  if shuffle and shuffle_buffer > 1:
    it = ShuffleWindows(it, shuffle_buffer, seed + 1)
  return it


def batch_rows(it: grain.IterDataset, *, packing: str, batch_size: int, seq_len: int,
               seed: int = 0, shuffle: bool = True) -> grain.IterDataset:
  """Batches of rows: windows stacked (concat), or pieces first-fit packed into rows with
  segment ids and positions (segments)."""
  if packing == "concat":
    return it.batch(batch_size, drop_remainder=True, batch_fn=_concat_batch)
  it = grain.experimental.FirstFitPackIterDataset(
      it, length_struct={"inputs": seq_len, "targets": seq_len}, num_packing_bins=batch_size,
      seed=seed + 2, shuffle_bins=shuffle, padding_struct={"inputs": 0, "targets": -1})
  return it.map(_segments_row).batch(batch_size, drop_remainder=True, batch_fn=_stack)


def document_batches(docs: grain.MapDataset, *, packing: str, batch_size: int, seq_len: int,
                     seed: int = 0, shuffle: bool = True, shuffle_buffer: int = 0,
                     num_epochs: int | None = None, process_index: int = 0,
                     process_count: int = 1, to_tokens: Callable | None = None,
                     read_threads: int = 2) -> grain.IterDataset:
  """Batches from documents: document_rows, then batch_rows."""
  it = document_rows(docs, packing=packing, seq_len=seq_len, seed=seed, shuffle=shuffle,
                     shuffle_buffer=shuffle_buffer, num_epochs=num_epochs,
                     process_index=process_index, process_count=process_count,
                     to_tokens=to_tokens, read_threads=read_threads)
  return batch_rows(it, packing=packing, batch_size=batch_size, seq_len=seq_len, seed=seed,
                    shuffle=shuffle)


# --------------------------------------------------------------------------------------------
# From the config


def _process(process_index, process_count) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, {process_count})")
  return process_index, process_count


@functools.lru_cache(maxsize=8)
def _load_tokenizer_cached(data_cfg, model_vocab: int) -> Tokenizer:
  return build_tokenizer(data_cfg, model_vocab)


def load_tokenizer(cfg) -> Tokenizer:
  """The tokenizer cfg.data.tokenizer names (a trained BPE is trained once and cached under
  data.cache_dir); an error if its vocab exceeds model.vocab_size."""
  cfg.data.validate()
  return _load_tokenizer_cached(cfg.data, cfg.model.vocab_size)


def make_dataset(cfg, split: str, *, batch_size: int, seq_len: int, seed: int | None = None,
                 shuffle: bool = True, num_epochs: int | None = None,
                 process_index: int | None = None,
                 process_count: int | None = None) -> grain.IterDataset:
  """Per-process batches of `split` ("train" or "validation"): dicts of int32 numpy arrays
  `inputs`, `targets` (-1: ignore), and with segments packing `segment_ids` and `positions`,
  each (batch_size, seq_len). `iter(ds)` is a checkpointable Grain DatasetIterator."""
  d = cfg.data
  d.validate()
  if split not in ("train", "validation"):
    raise ValueError(f"split={split!r}; use 'train' or 'validation'")
  if batch_size <= 0 or seq_len <= 0:
    raise ValueError(f"batch_size={batch_size} and seq_len={seq_len} must be positive")
  seed = d.seed if seed is None else seed
  pi, pc = _process(process_index, process_count)
  order = dict(seed=seed, shuffle=shuffle, num_epochs=num_epochs, process_index=pi,
               process_count=pc)

  if d.mixture:
    return _with_workers(d, _mixture_batches(cfg, split, batch_size, seq_len, order))
  flat, docs, to_tokens = _source(cfg, split)
  if docs is None:  # flat tokens, concat: windows read at random
    ds: Any = window_batches(flat, batch_size=batch_size, seq_len=seq_len, **order)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))
  else:
    ds = document_batches(docs, packing=d.packing, batch_size=batch_size, seq_len=seq_len,
                          shuffle_buffer=d.shuffle_buffer, to_tokens=to_tokens, **order)
  return _with_workers(d, ds)


def _with_workers(d, ds: grain.IterDataset) -> grain.IterDataset:
  """data.num_workers > 0: the pipeline runs in that many Grain worker processes."""
  if d.num_workers > 0:
    from absl import flags
    if not flags.FLAGS.is_parsed():  # Grain's workers read absl flags; outside an absl app
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=d.num_workers,
                                                     per_worker_buffer_size=d.prefetch))
  return ds


def _reference_tokens(cfg, split: str) -> src.FlatTokens:
  d = cfg.data
  flat = src.reference_tokens(d.path, split, d.cache_dir)
  if max(int(a.max(initial=0)) for a in flat.arrays[:1]) >= cfg.model.vocab_size:
    raise src.DataError(f"{flat.entries[0][1]} holds token ids >= model.vocab_size="
                        f"{cfg.model.vocab_size}; GPT-2 shards need model.vocab_size >= 50257")
  return flat


def _source(cfg, split: str):
  """(flat tokens, documents, to_tokens) of cfg.data's one source: flat token streams with
  concat packing give no documents (their windows are read at random); everything else gives
  documents, with `to_tokens` where they still need tokenizing or an end-of-text."""
  d = cfg.data
  flat = None
  if d.source == "reference_bin":
    flat = _reference_tokens(cfg, split)
  elif d.source == "shakespeare":
    flat = corpus.shakespeare_tokens(d, split, load_tokenizer(cfg))
  if flat is not None:
    docs = None if d.packing == "concat" else grain.MapDataset.source(_FlatDocuments(flat))
    return flat, docs, None
  if d.source == "arrayrecord":
    docs = grain.MapDataset.source(src.prepared_documents(d.path, split, d.cache_dir))
    return None, docs, _PrependEot(load_tokenizer(cfg).eot_id)
  docs = grain.MapDataset.source(corpus.documents(d, split))  # text or tfds
  return None, docs, _Tokenize(load_tokenizer(cfg))


def _source_rows(cfg, split: str, seq_len: int, order: dict) -> grain.IterDataset:
  """One source's rows before batching (windows or pieces), for a mixture."""
  flat, docs, to_tokens = _source(cfg, split)
  if docs is None:
    ds = _order(grain.MapDataset.source(_windows(flat, seq_len)), **order)
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=16))
  return document_rows(docs, packing=cfg.data.packing, seq_len=seq_len,
                       shuffle_buffer=cfg.data.shuffle_buffer, to_tokens=to_tokens, **order)


def _mixture_batches(cfg, split: str, batch_size: int, seq_len: int,
                     order: dict) -> grain.IterDataset:
  """data.mixture: each source's rows (its own slice per process, its own seed), interleaved
  by weight (Grain's mix: deterministic, and its state holds each source's position by name),
  then batched or packed as one stream. A finite read (validation) ends when any source ends."""
  rows, weights = {}, {}
  for i, (key, weight, data_cfg) in enumerate(mixture.components(cfg.data)):
    part = dataclasses.replace(cfg, data=data_cfg)
    rows[key] = _source_rows(part, split, seq_len, dict(order, seed=order["seed"] + 101 * i))
    weights[key] = weight
  return batch_rows(grain.IterDataset.mix(rows, weights), packing=cfg.data.packing,
                    batch_size=batch_size, seq_len=seq_len, seed=order["seed"],
                    shuffle=order["shuffle"])


class _FlatDocuments:
  """The documents of flat token streams: from each `<|endoftext|>` to the next (a file that
  starts mid-document contributes that partial document too)."""

  def __init__(self, tokens: src.FlatTokens):
    self.tokens = tokens
    spans = []
    for f, a in enumerate(tokens.arrays):
      starts = np.flatnonzero(np.asarray(a) == tokens.eot_id)
      if len(a) and (not len(starts) or starts[0] != 0):
        starts = np.concatenate([[0], starts])
      ends = np.append(starts[1:], len(a))
      spans.append(np.stack([np.full_like(starts, f), starts, ends], axis=1))
    self.spans = np.concatenate(spans).astype(np.int64) if spans else np.zeros((0, 3), np.int64)

  def __len__(self) -> int:
    return len(self.spans)

  def __getitem__(self, i: int) -> np.ndarray:
    f, s, e = self.spans[i]
    return np.asarray(self.tokens.arrays[f][s:e], dtype=np.int32)

