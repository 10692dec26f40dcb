"""Pipeline properties on synthetic tokens: determinism, resume, sharding, packing counts."""

import json

import grain
import numpy as np
import pytest

from t6_jax.data import pipeline
from t6_jax.data import sources as src

EOT = 0
T = 16
_READ = grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)


def _docs(n=60, seed=0):
  """Documents [EOT, unique ids...] of varied lengths (some longer than a window)."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, 3 * T, size=n)
  ids = np.arange(1, 1 + lengths.sum())
  return [np.concatenate([[EOT], part]).astype(np.int32)
          for part in np.split(ids, np.cumsum(lengths)[:-1])]


@pytest.fixture(scope="module")
def flat(tmp_path_factory):
  docs = _docs()
  path = tmp_path_factory.mktemp("flat") / "tokens.npy"
  np.save(path, np.concatenate(docs).astype(np.uint16))
  return src.FlatTokens([("npy", str(path))], EOT, name="synthetic"), np.concatenate(docs)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def _datasets(flat_tokens, **kw):
  docs = grain.MapDataset.source(_docs())
  return {
      "windows": lambda **o: pipeline.window_batches(flat_tokens, batch_size=4, seq_len=T,
                                                     **{**kw, **o}).to_iter_dataset(_READ),
      "stream": lambda **o: pipeline.document_batches(docs, packing="concat", batch_size=4,
                                                      seq_len=T, shuffle_buffer=8,
                                                      **{**kw, **o}),
      "segments": lambda **o: pipeline.document_batches(docs, packing="segments",
                                                        batch_size=4, seq_len=T,
                                                        shuffle_buffer=8, **{**kw, **o}),
  }


@pytest.mark.parametrize("kind", ["windows", "stream", "segments"])
def test_determinism_and_resume(flat, kind):
  make = _datasets(flat[0])[kind]
  a = _take(iter(make(seed=3)), 12)
  _same(a, _take(iter(make(seed=3)), 12))
  assert any(not np.array_equal(x["inputs"], y["inputs"])
             for x, y in zip(a, _take(iter(make(seed=4)), 12)))
  # Resume: state after 5 batches (through JSON, as a checkpoint stores it) gives batches 5..
  it = iter(make(seed=3))
  _take(it, 5)
  state = json.loads(json.dumps(it.get_state()))
  fresh = iter(make(seed=3))
  fresh.set_state(state)
  _same(_take(fresh, 7), a[5:12])
  # ... also across epoch boundaries (this corpus has ~50 windows per epoch)
  it = iter(make(seed=3))
  _take(it, 20)
  state = it.get_state()
  expect = _take(it, 6)
  fresh = iter(make(seed=3))
  fresh.set_state(state)
  _same(_take(fresh, 6), expect)


@pytest.mark.parametrize("count", [2, 4])
def test_windows_disjoint_complete_across_processes(flat, count):
  tokens, stream = flat
  n_windows = (len(stream) - 1) // T
  seen = []
  for index in range(count):
    ds = pipeline.window_batches(tokens, batch_size=1, seq_len=T, seed=1, num_epochs=1,
                                 process_index=index, process_count=count)
    seen += [_window_id(b, stream) for b in ds]
  assert len(seen) == len(set(seen)) == n_windows // count * count  # disjoint, equal shares
  assert set(seen) <= set(range(n_windows))


def _window_id(batch, stream):
  """Which window of the stream a row is, found by matching its tokens exactly."""
  row = np.concatenate([batch["inputs"][0], batch["targets"][0, -1:]])
  for k in range((len(stream) - 1) // T):
    if np.array_equal(stream[k * T:k * T + T + 1], row):
      return k
  raise AssertionError("row is not a window of the stream")


@pytest.mark.parametrize("count", [2, 4])
def test_documents_disjoint_complete_across_processes(count):
  docs = _docs(n=40, seed=5)
  targets = []
  for index in range(count):
    ds = pipeline.document_batches(grain.MapDataset.source(docs), packing="segments",
                                   batch_size=1, seq_len=T, seed=2, num_epochs=1,
                                   process_index=index, process_count=count)
    got = np.concatenate([b["targets"][b["targets"] >= 0] for b in ds])
    targets.append(set(got.tolist()))
    assert len(got) == len(targets[-1])  # no duplicates within a process
  for i in range(count):
    for j in range(i + 1, count):
      assert not targets[i] & targets[j]
  # Complete: every document dealt out (40 docs divide evenly) has all its tokens as targets.
  assert set().union(*targets) == set(np.concatenate([d[1:] for d in docs]).tolist())


def test_concat_stream_counts_every_token_once():
  docs = _docs(n=30, seed=7)
  ds = pipeline.document_batches(grain.MapDataset.source(docs), packing="concat", batch_size=2,
                                 seq_len=T, shuffle=False, num_epochs=1)
  batches = list(ds)
  inputs = np.concatenate([b["inputs"].reshape(-1) for b in batches])
  targets = np.concatenate([b["targets"].reshape(-1) for b in batches])
  stream = np.concatenate(docs)  # unshuffled: documents in order, EOT before each
  n = len(targets)
  assert n == (len(stream) - 1) // T // 2 * 2 * T  # full batches of full windows
  # The reference's windows: inputs stream[kT : kT+T], targets shifted by one.
  np.testing.assert_array_equal(inputs, np.concatenate(
      [stream[k * T:(k + 1) * T] for k in range(n // T)]))
  np.testing.assert_array_equal(targets, stream[1:n + 1])
  assert len(set(targets[targets != EOT].tolist())) == int((targets != EOT).sum())


def test_segments_counts_ids_and_positions():
  docs = _docs(n=50, seed=11)
  ds = pipeline.document_batches(grain.MapDataset.source(docs), packing="segments",
                                 batch_size=3, seq_len=T, seed=0, shuffle_buffer=16,
                                 num_epochs=1)
  owner = {int(t): (i, p) for i, d in enumerate(docs) for p, t in enumerate(d) if t != EOT}
  got_targets = []
  for b in ds:
    assert set(b) == {"inputs", "targets", "segment_ids", "positions"}
    for row in range(b["inputs"].shape[0]):
      seg, pos = b["segment_ids"][row], b["positions"][row]
      x, y = b["inputs"][row], b["targets"][row]
      assert np.all(y[seg == 0] == -1) and np.all(pos[seg == 0] == 0)
      ids = [s for s in np.unique(seg) if s]
      assert ids == list(range(1, len(ids) + 1))
      for s in ids:
        m = seg == s
        assert np.array_equal(np.flatnonzero(m), np.arange(m.argmax(), m.argmax() + m.sum()))
        np.testing.assert_array_equal(pos[m], np.arange(m.sum()))
        # A piece is a contiguous slice of one document: targets are inputs shifted by one.
        doc_i, start = owner[int(y[m][0])]
        piece = docs[doc_i][start - 1:start + m.sum()]
        np.testing.assert_array_equal(x[m], piece[:-1])
        np.testing.assert_array_equal(y[m], piece[1:])
      got_targets += y[seg > 0].tolist()
  expected = np.concatenate([d[1:] for d in docs]).tolist()
  # Every document token is a target exactly once, except the last rows that did not fill a
  # batch (drop_remainder): count what is missing and check it is only a partial batch.
  assert len(got_targets) == len(set(got_targets))
  assert set(got_targets) <= set(expected)
  assert len(expected) - len(got_targets) < 3 * T


def test_empty_and_too_short_sources(tmp_path):
  with pytest.raises(src.DataError, match="empty"):
    pipeline.document_batches(grain.MapDataset.source([]), packing="concat", batch_size=1,
                              seq_len=T)
  np.save(tmp_path / "short.npy", np.arange(5, dtype=np.uint16))
  with pytest.raises(src.DataError, match="fewer than one window"):
    pipeline.window_batches(src.FlatTokens([("npy", str(tmp_path / "short.npy"))], EOT),
                            batch_size=1, seq_len=T)
