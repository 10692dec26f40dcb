"""Tokenize a corpus into ArrayRecord files of documents.

    python -m t6_jax.data.prepare --out data_cache/prepared/shakespeare
    python -m t6_jax.data.prepare --config t6-small data.source=tfds data.tfds_name=NAME \\
        data.tokenizer=gpt2 --out /data/prepared/NAME
    python -m t6_jax.data.prepare --export-gpt2 gpt2.tiktoken   # needs internet once

The corpus is the one `data.*` describes (shakespeare, text or tfds). The output directory
holds `train.array_record`, `validation.array_record` (one record per document: its token ids,
without the end-of-text token the pipeline adds) and `meta.json` (token dtype, counts and the
tokenizer's spec). Train on it with `data.source=arrayrecord data.path=OUT`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

from t6_jax import storage
from t6_jax.data import corpus
from t6_jax.data import sources as src
from t6_jax.data.files import save_json
from t6_jax.data.pipeline import load_tokenizer
from t6_jax.data.tokenizers import PROBE, TokenizerError, gpt2_tokenizer, write_tiktoken_file


def _documents(d, split: str):
  if d.mixture:
    raise src.DataError("prepare tokenizes one corpus, and data.mixture names several; prepare "
                        "each text source on its own (data.source, data.path), then mix the "
                        "outputs as arrayrecord sources")
  if d.source not in corpus.TEXT_SOURCES:
    raise src.DataError(f"prepare tokenizes text corpora (data.source="
                        f"{', '.join(corpus.TEXT_SOURCES)}); data.source={d.source!r} is "
                        f"already tokenized")
  return corpus.documents(d, split)


def prepare(cfg, out: str, splits=("train", "validation"), *, chunk: int = 256,
            progress: bool = True) -> dict:
  """Writes the ArrayRecord files and meta.json into `out` (local or gs://...); returns the
  meta dict. For a bucket, each file is written into a local temporary folder, then uploaded."""
  storage.check(out, "--out")
  if not storage.is_remote(out):
    os.makedirs(out, exist_ok=True)
    return _prepare(cfg, out, out, splits, chunk, progress)
  with tempfile.TemporaryDirectory(prefix="t6_prepare_") as staging:
    return _prepare(cfg, out, staging, splits, chunk, progress)


def _prepare(cfg, out: str, local_out: str, splits, chunk: int, progress: bool) -> dict:
  """prepare() writing each file into `local_out` first (`out` itself when local)."""
  from array_record.python.array_record_module import ArrayRecordWriter
  from tqdm import tqdm
  d = cfg.data
  tok = load_tokenizer(cfg)
  dtype = "uint16" if tok.vocab_size <= 2**16 else "uint32"
  remote = local_out != out
  meta = {"format": "t6_jax tokenized documents, one ArrayRecord record per document",
          "version": 1, "dtype": dtype, "eot_id": tok.eot_id, "vocab_size": tok.vocab_size,
          "probe_ids": tok.encode(PROBE), "tokenizer": tok.spec(),
          "source": {"source": d.source, "path": d.path, "tfds_name": d.tfds_name},
          "splits": {}}
  for split in splits:
    docs = _documents(d, split)
    if len(docs) == 0:
      raise src.DataError(f"the {d.source} corpus has no {split} documents; nothing to prepare")
    file = f"{split}.array_record"
    tmp = os.path.join(local_out, file + ".tmp")
    writer = ArrayRecordWriter(tmp, "group_size:1")
    n_docs = n_tokens = 0
    bar = tqdm(total=len(docs), unit="doc", desc=f"{split}", disable=not progress)
    for lo in range(0, len(docs), chunk):
      texts = [docs[i] for i in range(lo, min(lo + chunk, len(docs)))]
      for ids in tok.encode_batch(texts):
        writer.write(np.asarray(ids, dtype=dtype).tobytes())
        n_docs += 1
        n_tokens += len(ids)
      bar.update(len(texts))
    bar.close()
    writer.close()
    os.replace(tmp, os.path.join(local_out, file))
    n_bytes = os.path.getsize(os.path.join(local_out, file))
    dest = storage.join(out, file) if remote else os.path.join(out, file)
    if remote:
      storage.copy(os.path.join(local_out, file), dest)
      os.remove(os.path.join(local_out, file))
    meta["splits"][split] = {"file": file, "documents": n_docs, "tokens": n_tokens,
                             "bytes": n_bytes}
    print(f"{split}: {n_docs:,} documents, {n_tokens:,} tokens (+{n_docs:,} end-of-text), "
          f"{n_bytes:,} bytes written to {dest}")
  if remote:
    storage.write_text(storage.join(out, src.PREPARED_META), json.dumps(meta, indent=1))
  else:
    save_json(os.path.join(out, src.PREPARED_META), meta, indent=1)
  return meta


def main(argv=None) -> int:
  from t6_jax import config as config_lib
  parser = argparse.ArgumentParser(
      prog="python -m t6_jax.data.prepare", description=__doc__.split("\n\n")[0],
      epilog="Overrides look like data.source=text data.path=corpus/ data.tokenizer=gpt2.")
  parser.add_argument("--config", help="YAML file or preset name (default: the demo defaults)")
  parser.add_argument("--out", help="output directory for the ArrayRecord files and meta.json")
  parser.add_argument("--splits", default="train,validation")
  parser.add_argument("--export-gpt2", metavar="FILE",
                      help="write GPT-2's BPE ranks to FILE (.tiktoken) for offline use; needs "
                           "tiktoken's cache or internet, and exits")
  parser.add_argument("--no-progress", action="store_true")
  parser.add_argument("overrides", nargs="*", help="section.key=value")
  args = parser.parse_args(argv)
  if args.export_gpt2:
    try:
      tok = gpt2_tokenizer()
    except TokenizerError:
      import tiktoken  # online: tiktoken downloads and caches the GPT-2 files
      tiktoken.get_encoding("gpt2")
      tok = gpt2_tokenizer()
    write_tiktoken_file(tok.ranks(), args.export_gpt2)
    print(f"wrote {len(tok.ranks()):,} GPT-2 BPE ranks to {args.export_gpt2}; use it with "
          f"data.tokenizer=gpt2:{args.export_gpt2}")
    return 0
  if not args.out:
    parser.error("--out DIR is required (or --export-gpt2 FILE)")
  try:
    cfg = config_lib.load(args.config, args.overrides)
    t0 = time.time()
    prepare(cfg, args.out, [s for s in args.splits.split(",") if s],
            progress=not args.no_progress)
  except (src.DataError, TokenizerError, config_lib.ConfigError, storage.StorageError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"done in {time.time() - t0:.1f}s; train with data.source=arrayrecord "
        f"data.path={args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
