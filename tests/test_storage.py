"""t6_jax.storage: local and bucket paths through etils.epath.

No bucket is reachable here, so gs:// is served by an in-memory fsspec file system registered
under the `gs` protocol (epath's fsspec backend asks fsspec for it, as it would for gcsfs).
That proves our side (paths stay URIs, nothing lands in a local folder named `gs:`, metrics and
TensorBoard files reach the bucket, resumed runs append); it cannot prove GCS itself. A real
gs:// path offline must fail in seconds with one line.
"""

import json
import os
import subprocess
import sys
import time

import pytest
from etils.epath import backend as epath_backend
from fsspec.implementations.memory import MemoryFileSystem

from t6_jax import storage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeGCS(MemoryFileSystem):
  """gs://bucket/key held in memory; a fresh store per test."""

  protocol = ("gs", "gcs")
  store: dict = {}
  pseudo_dirs = [""]

  @classmethod
  def _strip_protocol(cls, path):
    path = path[len("gs://"):] if path.startswith("gs://") else path
    return "/" + path.lstrip("/")

  def __init__(self, *args, finalize_on_close=None, **kwargs):
    super().__init__(*args, **kwargs)


@pytest.fixture
def fake_gcs(monkeypatch, tmp_path):
  FakeGCS.store, FakeGCS.pseudo_dirs = {}, [""]
  registry = sys.modules["fsspec.registry"]._registry  # restored by monkeypatch afterwards
  for name in ("gs", "gcs"):
    monkeypatch.setitem(registry, name, FakeGCS)
  epath_backend.fsspec_backend._get_filesystem.cache_clear()
  monkeypatch.setattr(storage, "_checked", {"gs://bucket"})  # no network probe for it
  monkeypatch.chdir(tmp_path)  # a stray local "gs:" folder would appear here
  yield FakeGCS
  FakeGCS.store = {}
  epath_backend.fsspec_backend._get_filesystem.cache_clear()
  assert not os.path.exists(tmp_path / "gs:")


def test_round_trips_on_a_bucket_and_locally(fake_gcs, tmp_path):
  for root in ("gs://bucket/dir", str(tmp_path / "local")):
    storage.makedirs(root)
    storage.write_text(storage.join(root, "a.txt"), "hello\n")
    storage.write_bytes(storage.join(root, "sub", "b.bin"), b"\x00\x01")
    assert storage.read_text(storage.join(root, "a.txt")) == "hello\n"
    assert storage.read_bytes(storage.join(root, "sub", "b.bin")) == b"\x00\x01"
    assert storage.exists(storage.join(root, "a.txt"))
    assert not storage.exists(storage.join(root, "missing"))
    assert "a.txt" in storage.listdir(root)
    assert [os.path.basename(p) for p in storage.glob(storage.join(root, "*.txt"))] == ["a.txt"]
    with storage.open(storage.join(root, "c.jsonl"), "w") as f:
      f.write('{"x": 1}\n')
    with storage.open(storage.join(root, "c.jsonl")) as f:
      assert json.loads(f.readline()) == {"x": 1}
    storage.remove(storage.join(root, "c.jsonl"))
    assert not storage.exists(storage.join(root, "c.jsonl"))
  assert storage.join("gs://bucket/dir", "x") == "gs://bucket/dir/x"
  assert fake_gcs.store["/bucket/dir/a.txt"].getvalue() == b"hello\n"
  storage.copy("gs://bucket/dir/a.txt", tmp_path / "copied.txt")
  assert (tmp_path / "copied.txt").read_text() == "hello\n"
  # Local atomic writes leave no temporary file behind.
  assert sorted(os.listdir(tmp_path / "local")) == ["a.txt", "sub"]


def test_metrics_and_tensorboard_reach_a_bucket_workdir_and_resume_appends(fake_gcs):
  from t6_jax.metrics import Metrics
  workdir = "gs://bucket/runs/tiny"
  m = Metrics(workdir, total_steps=4, progress=False, sync_s=0.0)
  m.write(1, {"loss": 5.0})
  assert storage.exists(storage.join(workdir, "metrics.jsonl"))  # synced as it goes
  m.write(2, {"loss": 4.0, "val_loss": 4.5})
  m.close()
  lines = storage.read_text(storage.join(workdir, "metrics.jsonl")).splitlines()
  assert [json.loads(line)["step"] for line in lines] == [1, 2]
  events = storage.listdir(storage.join(workdir, "tb"))
  assert events and all(e.startswith("events.out.tfevents") for e in events)
  assert storage.read_bytes(storage.join(workdir, "tb", events[0]))

  m = Metrics(workdir, total_steps=4, start_step=2, progress=False)  # a resumed run
  m.write(3, {"loss": 3.0})
  m.close()
  lines = storage.read_text(storage.join(workdir, "metrics.jsonl")).splitlines()
  assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
  assert len(storage.listdir(storage.join(workdir, "tb"))) == 2  # one event file per run

  from t6_jax.train import loop
  assert loop.logged(workdir, "loss") == [5.0, 4.0, 3.0]


def test_tokenizer_files_on_a_bucket(fake_gcs):
  from t6_jax.data import tokenizers
  ranks = {bytes([i]): i for i in range(256)}
  tokenizers.write_tiktoken_file(ranks, "gs://bucket/tok/bytes.tiktoken")
  assert tokenizers.read_tiktoken_file("gs://bucket/tok/bytes.tiktoken") == ranks
  with pytest.raises(tokenizers.TokenizerError, match="not found"):
    tokenizers.read_tiktoken_file("gs://bucket/tok/missing.tiktoken")


def test_parquet_and_compressed_text_on_a_bucket(fake_gcs):
  import io
  import pyarrow as pa
  import pyarrow.parquet as pq
  from t6_jax.data import tfds_text
  table = io.BytesIO()
  pq.write_table(pa.table({"text": ["one", "two"]}), table)
  storage.write_bytes("gs://bucket/hub/a.parquet", table.getvalue())
  zst = pa.BufferOutputStream()
  with pa.CompressedOutputStream(zst, "zstd") as f:
    f.write(b'{"text": "three"}\n{"text": "four"}\n')
  storage.write_bytes("gs://bucket/hub/b.jsonl.zst", zst.getvalue().to_pybytes())
  docs = [t for f in ("gs://bucket/hub/a.parquet", "gs://bucket/hub/b.jsonl.zst")
          for _, t in tfds_text.iter_documents(f, "file", "text")]
  assert docs == ["one", "two", "three", "four"]


def test_missing_package_is_one_line(monkeypatch):
  import importlib.util
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name in ("gcsfs", "tensorflow") else real(name, *a))
  with pytest.raises(storage.StorageError, match=r"train.workdir=gs://b/run: gs:// paths need "
                     r"the gcsfs package.*pip install gcsfs"):
    storage.check("gs://b/run", "train.workdir")


def test_offline_bucket_workdir_fails_fast_with_one_line(tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  start = time.time()
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "train.py"), "--config", "tiny",
       "train.workdir=gs://t6-jax-offline-test/run1"], cwd=tmp_path, env=env,
      capture_output=True, text=True, timeout=120)
  took = time.time() - start
  assert proc.returncode == 2, proc.stderr[-2000:]
  errors = [line for line in proc.stderr.splitlines() if line.strip()]
  assert len(errors) == 1 and errors[0].startswith("error: train.workdir=gs://"), proc.stderr
  assert "storage" in errors[0] or "gcsfs" in errors[0] or "credentials" in errors[0]
  assert "Traceback" not in proc.stderr + proc.stdout
  assert not os.path.exists(tmp_path / "gs:") and not os.listdir(tmp_path)
  assert took < 60, took  # jax import included; the storage check itself takes seconds
