"""Where documents and tokens come from.

Two kinds of source feed the pipeline:
- `FlatTokens`: token streams in files (the reference's .bin shards, the cached bundled corpus),
  each document already preceded by `<|endoftext|>`; windows are read from them at random.
- Documents at random access (`TextDocuments` to tokenize in the pipeline, `TokenDocuments`
  already tokenized): tfds datasets by name, local text through our tfds builder, and the
  ArrayRecord files of the prepare command.
All of them pickle as paths and settings and reopen their files lazily, so Grain worker
processes never receive copies of the data. The text corpora as a whole (the bundled one, corpus
names for caches) are in `t6_jax.data.corpus`.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Sequence

import numpy as np

from t6_jax import storage

REF_MAGIC, REF_VERSION, REF_HEADER_BYTES = 20240520, 1, 1024
GPT2_EOT_ID = 50256  # the reference's shards hold GPT-2 tokens; this one starts every document
# Compressed text and JSONL: suffix -> pyarrow's codec (tfds_text decompresses as it reads).
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".bz2": "bz2", ".lz4": "lz4"}
# The files data.source=text reads in a directory (tfds_text.iter_documents reads each kind).
TEXT_SUFFIXES = tuple([".parquet"] + [base + z for base in (".txt", ".jsonl", ".json")
                                      for z in ("", *COMPRESSIONS)])
PREPARED_META = "meta.json"


class DataError(ValueError):
  """A data source is missing or malformed; the message names the file and the fix."""


# --------------------------------------------------------------------------------------------
# Flat token streams


class FlatTokens:
  """Token streams in files: `("npy", path)` or `("bin", path, n_tokens)` entries (reference
  shards: uint16 after a 1024-byte header). Memory-mapped on first use."""

  def __init__(self, entries: Sequence[tuple], eot_id: int, name: str = ""):
    self.entries = [tuple(e) for e in entries]
    self.eot_id, self.name = eot_id, name
    self._arrays: list[np.ndarray] | None = None

  def __getstate__(self):
    return {"entries": self.entries, "eot_id": self.eot_id, "name": self.name, "_arrays": None}

  def __setstate__(self, state):
    self.__dict__.update(state)
    _ = self.arrays  # map the files before reader threads start

  @property
  def arrays(self) -> list[np.ndarray]:
    if self._arrays is None:
      arrays = []
      for e in self.entries:
        if e[0] == "npy":
          arrays.append(np.load(e[1], mmap_mode="r"))
        else:
          arrays.append(np.memmap(e[1], dtype=np.uint16, mode="r", offset=REF_HEADER_BYTES,
                                  shape=(e[2],)))
      self._arrays = arrays
    return self._arrays

  def lengths(self) -> list[int]:
    return [len(a) for a in self.arrays]


def read_reference_header(path: str) -> int:
  """Validates a reference shard (magic, version, token count vs file size); its token count."""
  if not (storage.exists(path) and not storage.isdir(path)):
    raise DataError(f"reference shard {path!r} not found")
  size = storage.size(path)
  if size < REF_HEADER_BYTES:
    raise DataError(f"{path} is {size} bytes, shorter than the 1024-byte header of a "
                    f"reference token shard; is it a .bin shard of the reference's "
                    f"data/fineweb-edu script?")
  with storage.open(path, "rb") as f:
    header = np.frombuffer(f.read(REF_HEADER_BYTES), dtype="<i4")
  if header[0] != REF_MAGIC:
    raise DataError(f"{path} is not a reference token shard: its header starts with "
                    f"{int(header[0])}, not the magic number {REF_MAGIC}")
  if header[1] != REF_VERSION:
    raise DataError(f"{path} has shard format version {int(header[1])}; only version "
                    f"{REF_VERSION} (uint16 GPT-2 tokens) is supported")
  n = int(header[2])
  if n < 0 or size != REF_HEADER_BYTES + 2 * n:
    raise DataError(f"{path} is truncated or corrupt: its header promises {n} uint16 tokens "
                    f"({REF_HEADER_BYTES + 2 * n} bytes in all) but the file has {size} bytes")
  return n



def expand_paths(pattern: str, suffixes: tuple[str, ...], what: str) -> list[str]:
  """Files from a comma-separated list of files, directories and globs (local or gs://...),
  sorted."""
  if not pattern:
    raise DataError(f"data.path is empty; set it to the {what} (files, a directory or a glob)")
  files = []
  for part in (p.strip() for p in pattern.split(",") if p.strip()):
    if storage.is_remote(part):
      storage.check(part, "data.path")
      if storage.isdir(part):
        found = [f for f in storage.walk_files(part) if f.endswith(suffixes)]
      else:
        found = [f for f in storage.glob(part) if not storage.isdir(f)]
    elif os.path.isdir(part):
      found = [os.path.join(r, f) for r, _, fs in os.walk(part) for f in fs if f.endswith(suffixes)]
    else:
      found = [f for f in glob.glob(part) if os.path.isfile(f)]
    if not found:
      raise DataError(f"data.path: {part!r} matches no {what} (looked for "
                      f"{'/'.join(suffixes)} files)")
    files += found
  return sorted(set(files))


def reference_tokens(path: str, split: str, cache_dir: str = "data_cache") -> FlatTokens:
  """The reference's shards: files named *_val_* (or else the first shard) are validation.
  Shards in a bucket are validated there, then copied once under `cache_dir` to be
  memory-mapped."""
  files = expand_paths(path, (".bin",), "reference token shards")
  val = [f for f in files if "_val_" in os.path.basename(f)] or files[:1]
  chosen = val if split == "validation" else [f for f in files if f not in val]
  if not chosen:
    raise DataError(f"data.path={path!r} holds only {len(files)} shard(s), all used for "
                    f"validation (shard 0 is validation); the train split needs more shards")
  entries = [("bin", f, read_reference_header(f)) for f in chosen]
  entries = [(kind, storage.local_copy(f, cache_dir), n) for kind, f, n in entries]
  return FlatTokens(entries, GPT2_EOT_ID, name=f"reference:{split}")


# --------------------------------------------------------------------------------------------
# Documents at random access


class _OpenedOnUnpickle:
  """Pickles without its open reader and reopens it at once when unpickled: in a worker's
  main thread, before Grain's reader threads start (importing tfds lazily from two threads at
  once deadlocks in etils' lazy imports)."""

  _source = None

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_source"] = None
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    _ = self.source

  def __len__(self) -> int:
    return self._len


class TextDocuments(_OpenedOnUnpickle):
  """Text documents of a tfds data source (by name, or our builder for local files)."""

  def __init__(self, opener: tuple, text_key: str, name: str):
    self.opener, self.text_key, self.name = opener, text_key, name
    self._source = None
    self._len = len(self.source)

  @property
  def source(self):
    if self._source is None:
      kind, args = self.opener
      if kind == "local":
        from t6_jax.data import tfds_text
        files, data_dir, config, split = args
        self._source = tfds_text.prepared_builder(files, data_dir, **config).as_data_source(split)
      else:
        import tensorflow_datasets as tfds
        name, split, data_dir = args
        self._source = tfds.data_source(name, split=split, data_dir=data_dir or None,
                                        download=False, try_gcs=False)
    return self._source

  def __getitem__(self, i: int) -> str:
    record = self.source[i]
    text = record[self.text_key] if isinstance(record, dict) else record
    return text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text)


class TokenDocuments(_OpenedOnUnpickle):
  """Tokenized documents, one ArrayRecord record each (written by `t6_jax.data.prepare`)."""

  def __init__(self, path: str, dtype: str, name: str = ""):
    self.path, self.dtype, self.name = path, dtype, name
    self._source = None
    self._len = len(self.source)

  @property
  def source(self):
    if self._source is None:
      import grain
      self._source = grain.sources.ArrayRecordDataSource([self.path])
    return self._source

  def __getitem__(self, i: int) -> np.ndarray:
    return np.frombuffer(self.source[i], dtype=self.dtype)


def local_text_documents(d, split: str) -> TextDocuments:
  """data.path's text / JSONL / Parquet files through our tfds builder (prepared once under
  cache_dir)."""
  files = expand_paths(d.path, TEXT_SUFFIXES, "text, JSONL or Parquet files")
  config = {"text_docs": d.text_docs, "text_key": d.text_key, "val_fraction": d.val_fraction}
  data_dir = os.path.join(d.cache_dir, "tfds")
  return TextDocuments(("local", (files, data_dir, config, split)), "text", name=f"text:{split}")


def tfds_data_dir(data_dir: str = "") -> str:
  """Where tfds datasets live: data_dir, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
  return data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.expanduser(
      "~/tensorflow_datasets")


def tfds_prepared_dir(name: str, data_dir: str) -> str | None:
  """The directory of a prepared tfds dataset (`name[/config][:version]`), or None."""
  base, _, version = name.partition(":")
  root = os.path.join(data_dir, *base.split("/"))
  pattern = os.path.join(root, version or "*", "dataset_info.json")
  found = sorted(glob.glob(pattern))
  if not found and "/" not in base:  # a default config: name/<config>/<version>
    found = sorted(glob.glob(os.path.join(root, "*", version or "*", "dataset_info.json")))
  return os.path.dirname(found[-1]) if found else None


def tfds_documents(d, split_name: str) -> TextDocuments:
  """A tfds dataset by name, read through `tfds.data_source`; it must be prepared already
  (checked first, so an offline machine gets this error instead of download retries)."""
  if not d.tfds_name:
    raise DataError("data.source=tfds needs data.tfds_name, e.g. data.tfds_name=fineweb_edu")
  data_dir = tfds_data_dir(d.tfds_data_dir)
  if tfds_prepared_dir(d.tfds_name, data_dir) is None:
    raise DataError(
        f"tfds dataset {d.tfds_name!r} is not prepared under {data_dir!r}; prepare it in "
        f"ArrayRecord format where the data can be downloaded (`tfds build "
        f"{d.tfds_name.split(':')[0]} --data_dir DIR --file_format array_record`) and set "
        f"data.tfds_data_dir=DIR")
  return TextDocuments(("tfds", (d.tfds_name, split_name, data_dir)), d.text_key,
                       name=f"tfds:{d.tfds_name}:{split_name}")


def read_prepared_meta(path: str) -> dict:
  storage.check(path, "data.path")
  meta_path = storage.join(path, PREPARED_META)
  if not (storage.exists(meta_path) and not storage.isdir(meta_path)):
    raise DataError(f"data.path={path!r} is not a prepared dataset (no {PREPARED_META}); "
                    f"create one with `python -m t6_jax.data.prepare --out {path} ...`")
  return json.loads(storage.read_text(meta_path))


def prepared_documents(path: str, split: str, cache_dir: str = "data_cache") -> TokenDocuments:
  """One split of a prepared dataset; a split file in a bucket is copied once under
  `cache_dir` (the ArrayRecord reader needs a local file)."""
  meta = read_prepared_meta(path)
  if split not in meta["splits"]:
    raise DataError(f"{path} has no {split!r} split (it has {', '.join(meta['splits'])})")
  file = storage.join(path, meta["splits"][split]["file"])
  if not (storage.exists(file) and not storage.isdir(file)):
    raise DataError(f"{file} is missing; re-run the prepare command for {path}")
  return TokenDocuments(storage.local_copy(file, cache_dir), meta["dtype"],
                        name=f"arrayrecord:{split}")
