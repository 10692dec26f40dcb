"""A tensorflow-datasets builder for local text, JSONL and Parquet corpora, prepared to ArrayRecord.

Local corpora thus take the same path as tfds datasets by name: `tfds.core` prepares them once
into `<data_dir>/t6_local_text/<config>/1.0.0/` and `as_data_source` reads documents at random
(no TensorFlow needed). A config names the files (with their sizes and modification times, so
an edited corpus is prepared anew), how files split into documents and the validation share.

Documents: a `.txt` file is one document (`text_docs=file`), or one per blank-line-separated
paragraph (`paragraphs`) or per line (`lines`); a `.jsonl` file holds one JSON object per line
whose `text_key` field is a document; a `.parquet` file (how Hugging Face hubs ship corpora)
holds one document per row, in its `text_key` column. Text and JSONL files may be compressed
(`.gz`, `.zst`, `.bz2`, `.lz4`: pyarrow's codecs, decompressed as they stream). Validation
gets the `val_fraction` of documents with the smallest CRC32 of their key (at least one), so
the split is the same on every machine.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import zlib
from typing import Iterator, Sequence

import tensorflow_datasets as tfds

from t6_jax import storage
from t6_jax.data.sources import COMPRESSIONS


def validation_keys(keys: Sequence[str], val_fraction: float) -> set[str]:
  """The documents that form the validation split: a deterministic, order-free choice."""
  if len(keys) < 2 or val_fraction <= 0:
    return set()
  n_val = min(len(keys) - 1, max(1, round(len(keys) * val_fraction)))
  return set(sorted(keys, key=lambda k: (zlib.crc32(k.encode()), k))[:n_val])


def _split_compression(path: str) -> tuple[str, str | None]:
  """(the path without a compression suffix, pyarrow's codec name or None)."""
  for suffix, codec in COMPRESSIONS.items():
    if path.endswith(suffix):
      return path[:-len(suffix)], codec
  return path, None


def _open_text(path: str):
  """A text file, local or in a bucket, maybe compressed, read as UTF-8 with bad bytes
  replaced."""
  _, codec = _split_compression(path)
  if codec is None and not storage.is_remote(path):
    return open(path, encoding="utf-8", errors="replace")
  raw = storage.open(path, "rb") if storage.is_remote(path) else path
  if codec is not None:
    import pyarrow as pa
    raw = pa.input_stream(raw, compression=codec)  # decompressed as it is read
  return io.TextIOWrapper(raw, encoding="utf-8", errors="replace")


def _parquet_documents(path: str, text_key: str) -> Iterator[tuple[str, str]]:
  import pyarrow.parquet as pq
  try:
    table = pq.ParquetFile(storage.open(path, "rb") if storage.is_remote(path) else path)
  except Exception as e:  # pyarrow's ArrowInvalid and friends
    raise ValueError(f"{path} is not a readable Parquet file: {e}") from e
  try:
    columns = table.schema_arrow.names
    if text_key not in columns:
      raise ValueError(f"{path} has no {text_key!r} column (it has: {', '.join(columns)}); "
                       f"set data.text_key to the column that holds the text")
    n = 0
    for batch in table.iter_batches(batch_size=1024, columns=[text_key]):
      for text in batch.column(0).to_pylist():
        if text is not None:
          text = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text)
          if text.strip():
            yield f"{path}:{n}", text
        n += 1
  finally:
    table.close(force=True)  # a bucket's file object too, which pyarrow would leave open


def file_ident(path: str) -> tuple:
  """What names a file's version for cache keys: path, size and (locally) mtime."""
  if storage.is_remote(path):
    return (path, storage.size(path))
  return (path, os.path.getsize(path), os.stat(path).st_mtime_ns)


def iter_documents(path: str, text_docs: str, text_key: str) -> Iterator[tuple[str, str]]:
  """(key, text) for every non-empty document of one file."""
  if path.endswith(".parquet"):
    yield from _parquet_documents(path, text_key)
    return
  if _split_compression(path)[0].endswith((".jsonl", ".json")):
    with _open_text(path) as f:
      for n, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          record = json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}:{n} is not a JSON object per line: {e}") from e
        if not isinstance(record, dict) or text_key not in record:
          raise ValueError(f"{path}:{n} has no {text_key!r} field; set data.text_key to the "
                           f"field that holds the text")
        if str(record[text_key]).strip():
          yield f"{path}:{n}", str(record[text_key])
    return
  with _open_text(path) as f:
    text = f.read()
  if text_docs == "file":
    parts = [text]
  elif text_docs == "paragraphs":
    parts = re.split(r"\n\s*\n", text)
  else:
    parts = text.splitlines()
  for n, part in enumerate(parts):
    if part.strip():
      yield f"{path}:{n}", part


class LocalTextConfig(tfds.core.BuilderConfig):
  """One local corpus: files plus the document and split settings."""

  def __init__(self, *, files: Sequence[str], text_docs: str = "file", text_key: str = "text",
               val_fraction: float = 0.05):
    files = sorted(f if storage.is_remote(f) else os.path.abspath(f) for f in files)
    ident = [file_ident(f) for f in files]
    digest = hashlib.sha256(json.dumps([ident, text_docs, text_key, val_fraction]).encode())
    super().__init__(name="c" + digest.hexdigest()[:12], version="1.0.0",
                     description=f"{len(files)} local text files")
    self.files, self.text_docs, self.text_key = files, text_docs, text_key
    self.val_fraction = val_fraction


class T6LocalText(tfds.core.GeneratorBasedBuilder):
  """Local text / JSONL / Parquet documents -> ArrayRecord splits `train` and `validation`."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIG_CLASS = LocalTextConfig

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Local text corpus prepared by t6_jax.data",
        features=tfds.features.FeaturesDict({"text": tfds.features.Text(),
                                             "key": tfds.features.Text()}),
        disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    cfg = self.builder_config
    keys = [k for f in cfg.files for k, _ in iter_documents(f, cfg.text_docs, cfg.text_key)]
    if not keys:
      raise ValueError(f"no documents found in {len(cfg.files)} file(s) "
                       f"({', '.join(cfg.files[:3])}...): the corpus is empty")
    val = validation_keys(keys, cfg.val_fraction)
    if not val:
      raise ValueError(f"the corpus has {len(keys)} document(s); a train/validation split "
                       f"needs at least 2 (set data.text_docs=paragraphs or lines to split "
                       f"files into more documents)")
    return {"train": self._generate_examples(val, False),
            "validation": self._generate_examples(val, True)}

  def _generate_examples(self, val: set[str], is_val: bool):
    cfg = self.builder_config
    for f in cfg.files:
      for key, text in iter_documents(f, cfg.text_docs, cfg.text_key):
        if (key in val) == is_val:
          yield key, {"text": text, "key": key}


def prepared_builder(files: Sequence[str], data_dir: str, **config) -> T6LocalText:
  """The builder for these files, prepared to ArrayRecord under `data_dir` if not yet.

  Processes that share `data_dir` (several per host, each reading its slice) take turns under
  a file lock: the first prepares the corpus, the others find it prepared. Without the lock
  they would all prepare it and all but one fail to rename their copy into place."""
  if storage.is_remote(data_dir):
    return _prepared_builder(files, data_dir, config)
  import fcntl
  os.makedirs(data_dir, exist_ok=True)
  with open(os.path.join(data_dir, ".t6_local_text.lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
    return _prepared_builder(files, data_dir, config)


def _prepared_builder(files: Sequence[str], data_dir: str, config: dict) -> T6LocalText:
  from absl import logging as absl_logging
  verbosity = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)  # not "Using custom data configuration" each time
  try:
    builder = T6LocalText(config=LocalTextConfig(files=files, **config), data_dir=data_dir,
                          file_format="array_record")
  finally:
    absl_logging.set_verbosity(verbosity)
  if not os.path.exists(os.path.join(builder.data_dir, "dataset_info.json")):
    builder.download_and_prepare()
  return builder
