"""Tokenizers behind one interface: GPT-2 (tiktoken), Hugging Face JSON, sentencepiece, and a
byte-level BPE trained on the corpus (Hugging Face `tokenizers`); and `build_tokenizer`, the
tokenizer a data config names (training and caching the BPE when it names `bpe`).

Every tokenizer has `encode(text) -> list[int]` (no special tokens added), `decode(ids)`,
`vocab_size`, `eot_id` (the end-of-text id put before every document) and `spec()`, a
JSON-able dict from which `tokenizer_from_spec` rebuilds it offline. A trained BPE and a
sentencepiece model are embedded whole in the spec, so a run directory is self-contained;
GPT-2 is rebuilt from a local `.tiktoken` file or tiktoken's cache. Tokenizers pickle as their
spec, so Grain worker processes rebuild them instead of copying Rust objects.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import sys
import tempfile
import time
import zlib
from typing import Iterable, Iterator, Sequence

import numpy as np

from t6_jax.data import corpus
from t6_jax.data import sources as src
from t6_jax.data.files import save_json

from t6_jax import storage

EOT_TOKEN = "<|endoftext|>"
# Encoded by every tokenizer that writes or reads prepared data: equal ids = same tokenizer.
PROBE = "The quick brown fox, 1234 times: ÆØÅ ünïcödé\n\tspaces   and <tags>!"
# tiktoken's GPT-2 pre-tokenisation pattern (r50k), equivalent to the original GPT-2 regex.
GPT2_PATTERN = (r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|"""
                r"""\s+(?!\S)|\s""")
_GPT2_URLS = {  # the files tiktoken's get_encoding("gpt2") downloads, one of the two sets
    "data_gym": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
                 "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json"),
    "r50k": ("https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken",),
}


class TokenizerError(ValueError):
  """A tokenizer cannot be built or loaded; the message says how to provide it."""


class Tokenizer:
  """Common interface. Subclasses set `vocab_size` and `eot_id` and implement the codec."""

  vocab_size: int
  eot_id: int

  def encode(self, text: str) -> list[int]:
    raise NotImplementedError

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [self.encode(t) for t in texts]

  def decode(self, ids: Iterable[int]) -> str:
    raise NotImplementedError

  def spec(self) -> dict:
    raise NotImplementedError

  def fingerprint(self) -> str:
    """A short hash of the spec: names caches of data tokenized with this tokenizer."""
    blob = json.dumps(self.spec(), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]

  def __reduce__(self):
    return tokenizer_from_spec, (self.spec(),)

  def __repr__(self) -> str:
    return (f"{type(self).__name__}(name={self.spec().get('name')!r}, "
            f"vocab_size={self.vocab_size}, eot_id={self.eot_id})")


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes as ids 0..254 and `<|endoftext|>` = 255: a vocab of 256 for tiny models
  (byte 255 never occurs in UTF-8)."""

  vocab_size, eot_id = 256, 255

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def decode(self, ids: Iterable[int]) -> str:
    return bytes(int(i) for i in ids if int(i) != self.eot_id).decode("utf-8", errors="replace")

  def spec(self) -> dict:
    return {"kind": "bytes", "name": "bytes"}


class HFTokenizer(Tokenizer):
  """A Hugging Face `tokenizers` JSON tokenizer (also the trained byte-level BPE)."""

  def __init__(self, json_str: str, *, name: str = "hf", eot_token: str = EOT_TOKEN):
    import tokenizers
    self._json = json_str
    self._name = name
    self._eot_token = eot_token
    self._tok = tokenizers.Tokenizer.from_str(json_str)
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    eot = self._tok.token_to_id(eot_token)
    if eot is None:
      raise TokenizerError(f"tokenizer {name!r} has no end-of-text token {eot_token!r}; set "
                           f"data.eot_token to one of its special tokens")
    self.eot_id = eot

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Iterable[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

  def spec(self) -> dict:
    return {"kind": "hf", "name": self._name, "eot_token": self._eot_token, "json": self._json}


class TiktokenTokenizer(Tokenizer):
  """A BPE given by its merge ranks (GPT-2's, a `.tiktoken` file, or a trained one), run by
  tiktoken with GPT-2's pre-tokenisation; `<|endoftext|>` is the id after the last rank.

  With `embed=True` the ranks travel inside the spec (trained BPEs: small, self-contained).
  """

  def __init__(self, ranks: dict[bytes, int], *, name: str, path: str = "", embed: bool = False):
    import tiktoken
    self._name, self._path, self._embed = name, path, embed
    self._ranks = ranks
    eot = max(ranks.values()) + 1  # GPT-2: 50256
    self._enc = tiktoken.Encoding(name, pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                  special_tokens={EOT_TOKEN: eot})
    self.vocab_size = self._enc.n_vocab
    self.eot_id = eot

  def encode(self, text: str) -> list[int]:
    return self._enc.encode_ordinary(text)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return self._enc.encode_ordinary_batch(list(texts), num_threads=2)

  def decode(self, ids: Iterable[int]) -> str:
    return self._enc.decode([int(i) for i in ids])

  def ranks(self) -> dict[bytes, int]:
    return self._ranks

  def spec(self) -> dict:
    if self._embed:
      return {"kind": "tiktoken", "name": self._name, "ranks": ranks_to_text(self.ranks())}
    return {"kind": "tiktoken", "name": self._name, "path": self._path}


class SentencePieceTokenizer(Tokenizer):
  """A sentencepiece model; the serialized model travels inside the spec."""

  def __init__(self, model_proto: bytes, *, name: str = "spm", eot_token: str = EOT_TOKEN):
    import sentencepiece as spm
    self._proto, self._name, self._eot_token = model_proto, name, eot_token
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.vocab_size = self._sp.get_piece_size()
    eot = self._sp.piece_to_id(eot_token)
    if eot == self._sp.unk_id() and eot_token != self._sp.id_to_piece(self._sp.unk_id()):
      eot = self._sp.eos_id()
    if eot < 0:
      raise TokenizerError(f"sentencepiece model {name!r} has neither {eot_token!r} nor an "
                           f"end-of-sentence id; set data.eot_token to one of its pieces")
    self.eot_id = eot

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return self._sp.encode(list(texts))

  def decode(self, ids: Iterable[int]) -> str:
    return self._sp.decode([int(i) for i in ids])

  def spec(self) -> dict:
    return {"kind": "spm", "name": self._name, "eot_token": self._eot_token,
            "model_b64": base64.b64encode(self._proto).decode("ascii")}


# --------------------------------------------------------------------------------------------
# Loading


def ranks_from_text(text: bytes | str, where: str) -> dict[bytes, int]:
  """Parses `.tiktoken` content: one `base64(token) rank` pair per line."""
  if isinstance(text, str):
    text = text.encode("ascii")
  ranks = {}
  for n, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    try:
      token, rank = line.split()
      ranks[base64.b64decode(token, validate=True)] = int(rank)
    except ValueError as e:
      raise TokenizerError(f"{where}:{n} is not a `base64-token rank` line: {line[:60]!r}") from e
  if not ranks:
    raise TokenizerError(f"{where} holds no BPE ranks")
  return ranks


def ranks_to_text(ranks: dict[bytes, int]) -> str:
  return "".join(f"{base64.b64encode(t).decode('ascii')} {r}\n"
                 for t, r in sorted(ranks.items(), key=lambda kv: kv[1]))


def read_tiktoken_file(path: str) -> dict[bytes, int]:
  storage.check(path, "tiktoken file")
  if not storage.exists(path) or storage.isdir(path):
    raise TokenizerError(f"tiktoken file {path!r} not found")
  return ranks_from_text(storage.read_bytes(path), path)


def write_tiktoken_file(ranks: dict[bytes, int], path: str) -> None:
  storage.write_text(path, ranks_to_text(ranks))


def _tiktoken_cache_dir() -> str:
  for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
    if var in os.environ:
      return os.environ[var]
  return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def _cached(url: str) -> str | None:
  path = os.path.join(_tiktoken_cache_dir(), hashlib.sha1(url.encode()).hexdigest())
  return path if os.path.isfile(path) else None


def gpt2_tokenizer(path: str = "") -> TiktokenTokenizer:
  """GPT-2 BPE from a local `.tiktoken` file, else from tiktoken's cache; never downloads."""
  if path:
    return TiktokenTokenizer(read_tiktoken_file(path), name="gpt2",
                             path=path if storage.is_remote(path) else os.path.abspath(path))
  if all(_cached(u) for u in _GPT2_URLS["r50k"]) or all(_cached(u) for u in _GPT2_URLS["data_gym"]):
    import tiktoken
    enc = tiktoken.get_encoding("gpt2")  # served from the cache checked above
    return TiktokenTokenizer(encoding_ranks(enc), name="gpt2")
  raise TokenizerError(
      "the GPT-2 BPE files are not available offline (looked in tiktoken's cache "
      f"{_tiktoken_cache_dir()!r}, set by TIKTOKEN_CACHE_DIR). Provide them in one of two ways: "
      "(1) on a machine with internet run `python -m t6_jax.data.prepare --export-gpt2 "
      "gpt2.tiktoken`, copy the file here and set data.tokenizer=gpt2:/path/to/gpt2.tiktoken; "
      "or (2) copy a filled tiktoken cache directory here and set TIKTOKEN_CACHE_DIR to it")


def encoding_ranks(enc) -> dict[bytes, int]:
  """The merge ranks of a tiktoken Encoding, read back token by token through its public API
  (the ranks of a BPE are its ordinary token ids)."""
  special = {enc.encode_single_token(t) for t in enc.special_tokens_set}
  return {enc.decode_single_token_bytes(i): i for i in range(enc.n_vocab) if i not in special}


def tokenizer_from_spec(spec: dict) -> Tokenizer:
  """Rebuilds a tokenizer from `Tokenizer.spec()` (e.g. the tokenizer.json of a run)."""
  kind = spec.get("kind")
  if kind == "hf":
    return HFTokenizer(spec["json"], name=spec.get("name", "hf"),
                       eot_token=spec.get("eot_token", EOT_TOKEN))
  if kind == "tiktoken":
    if "ranks" in spec:
      return TiktokenTokenizer(ranks_from_text(spec["ranks"], "tokenizer spec"),
                               name=spec.get("name", "bpe"), embed=True)
    path = spec.get("path", "")
    if spec.get("name") == "gpt2":
      return gpt2_tokenizer(path if path and os.path.isfile(path) else "")
    return TiktokenTokenizer(read_tiktoken_file(path), name=spec.get("name", "tiktoken"),
                             path=path)
  if kind == "bytes":
    return ByteTokenizer()
  if kind == "spm":
    return SentencePieceTokenizer(base64.b64decode(spec["model_b64"]),
                                  name=spec.get("name", "spm"),
                                  eot_token=spec.get("eot_token", EOT_TOKEN))
  raise TokenizerError(f"unknown tokenizer spec kind {kind!r}; expected hf, tiktoken or spm")


def load_named(name: str, *, eot_token: str = EOT_TOKEN) -> Tokenizer:
  """A tokenizer by its data.tokenizer string (everything except `bpe`, which needs a corpus):
  `bytes`, `gpt2`, `gpt2:FILE.tiktoken`, `tiktoken:FILE`, `hf:FILE.json`, `spm:FILE.model`."""
  kind, _, path = name.partition(":")
  if kind == "bytes":
    return ByteTokenizer()
  if kind == "gpt2":
    return gpt2_tokenizer(path)
  if kind == "tiktoken":
    if not path:
      raise TokenizerError("data.tokenizer=tiktoken:PATH needs the path of a .tiktoken file")
    return TiktokenTokenizer(read_tiktoken_file(path), name=os.path.basename(path),
                             path=path if storage.is_remote(path) else os.path.abspath(path))
  if kind in ("hf", "spm"):
    if path:
      storage.check(path, "data.tokenizer")
    if not path or not storage.exists(path) or storage.isdir(path):
      raise TokenizerError(f"data.tokenizer={name!r}: file {path!r} not found")
    if kind == "hf":
      return HFTokenizer(storage.read_text(path), name=os.path.basename(path),
                         eot_token=eot_token)
    return SentencePieceTokenizer(storage.read_bytes(path), name=os.path.basename(path),
                                  eot_token=eot_token)
  raise TokenizerError(f"data.tokenizer={name!r} is not a tokenizer; use bpe, bytes, gpt2, "
                       f"gpt2:FILE.tiktoken, tiktoken:FILE, hf:FILE.json or spm:FILE.model")


# GPT-2's byte -> printable-character table, used by byte-level BPE vocabularies.
def _byte_level_chars() -> dict[str, int]:
  keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
          *range(ord("\xae"), ord("\xff") + 1)]
  chars, extra = {}, 0
  for b in range(256):
    if b in keep:
      chars[chr(b)] = b
    else:
      chars[chr(256 + extra)] = b
      extra += 1
  return chars


def train_bpe(texts: Iterable[str], vocab_size: int, *, name: str = "bpe") -> TiktokenTokenizer:
  """Trains a byte-level BPE with Hugging Face `tokenizers` (GPT-2 pre-tokenisation, all 256
  bytes, `<|endoftext|>` last) and returns it as a tiktoken tokenizer: tiktoken encodes about
  ten times faster, and ranks in merge order make its greedy merging the trained BPE. The vocab
  may come out smaller than asked on a tiny corpus."""
  import tokenizers
  from tokenizers import models, pre_tokenizers, trainers
  if vocab_size < 257 + 1:
    raise TokenizerError(f"a byte-level BPE needs a vocab of at least 258 (256 bytes + "
                         f"<|endoftext|> + merges), got {vocab_size}; for a smaller model "
                         f"vocab use data.tokenizer=bytes (256 ids)")
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(texts, trainer=trainer)
  chars = _byte_level_chars()
  vocab = json.loads(tok.to_str())["model"]["vocab"]  # token string -> id, ids in merge order
  ranks = {bytes(chars[c] for c in piece): r
           for r, piece in enumerate(sorted(vocab, key=vocab.get))}
  return TiktokenTokenizer(ranks, name=name, embed=True)


# --------------------------------------------------------------------------------------------
# The tokenizer of a data config


def bpe_training_texts(d, max_bytes: int) -> Iterator[str]:
  """Train-split documents of a text source in a fixed pseudo-random order, up to max_bytes."""
  if d.source not in corpus.TEXT_SOURCES:
    raise src.DataError(f"data.tokenizer=bpe trains on the text of the corpus, but "
                        f"data.source={d.source!r} holds tokens; name the tokenizer those "
                        f"tokens were made with (data.tokenizer=gpt2 for the reference's shards)")
  docs = corpus.documents(d, "train")
  if len(docs) == 0:
    raise src.DataError(f"the {d.source} corpus has no training documents to train a BPE on")
  # A fixed pseudo-random order over (at most 100k evenly spaced) documents.
  candidates = (range(len(docs)) if len(docs) <= 100_000 else
                np.unique(np.linspace(0, len(docs) - 1, 100_000).astype(np.int64)).tolist())
  order = sorted(candidates, key=lambda i: zlib.crc32(str(i).encode()))
  total = 0
  for i in order:
    text = docs[i]
    yield text
    total += len(text.encode("utf-8", errors="replace"))
    if total >= max_bytes:
      return


def _cached_bpe(d, vocab_size: int) -> Tokenizer:
  """The BPE of the corpus, trained once and kept under data.cache_dir/tokenizers/."""
  name = f"bpe-{corpus.corpus_id(d)}-v{vocab_size}-b{d.bpe_train_bytes}"
  path = os.path.join(d.cache_dir, "tokenizers", name + ".json")
  if os.path.isfile(path):
    with open(path) as f:
      return tokenizer_from_spec(json.load(f))
  t0 = time.time()
  tok = train_bpe(bpe_training_texts(d, d.bpe_train_bytes), vocab_size, name=name)
  save_json(path, tok.spec())
  print(f"trained a byte-level BPE of {tok.vocab_size} tokens on the {d.source} corpus in "
        f"{time.time() - t0:.1f}s -> {path}", file=sys.stderr)
  return tok


def build_tokenizer(d, model_vocab: int) -> Tokenizer:
  """The tokenizer of DataConfig `d` (see `t6_jax.data.load_tokenizer`)."""
  if d.tokenizer == "bpe":
    if d.source == "arrayrecord":
      tok = tokenizer_from_spec(src.read_prepared_meta(d.path)["tokenizer"])
    elif d.source == "reference_bin":
      raise TokenizerError("the reference's shards hold GPT-2 tokens: set data.tokenizer=gpt2 "
                           "(or gpt2:FILE.tiktoken offline)")
    else:
      tok = _cached_bpe(d, min(d.bpe_vocab_size or model_vocab, model_vocab))
  else:
    tok = load_named(d.tokenizer, eot_token=d.eot_token)
    if d.source == "arrayrecord":
      meta = src.read_prepared_meta(d.path)
      if tok.encode(PROBE) != meta["probe_ids"] or tok.eot_id != meta["eot_id"]:
        raise TokenizerError(f"data.tokenizer={d.tokenizer!r} is not the tokenizer "
                             f"{d.path} was prepared with ({meta['tokenizer'].get('name')!r}); "
                             f"set data.tokenizer=bpe to use the recorded one")
  if tok.vocab_size > model_vocab:
    need = -(-tok.vocab_size // 64) * 64
    raise TokenizerError(f"tokenizer {tok.spec().get('name')!r} has {tok.vocab_size} tokens but "
                         f"model.vocab_size={model_vocab}; set model.vocab_size={need} (or "
                         f"more), or a smaller data.bpe_vocab_size")
  return tok
