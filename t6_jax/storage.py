"""User-given paths, local or in a bucket (gs://, s3://, ...), through etils.epath.

Every file the user names (run directories, data, tokenizers, exports, metrics) goes through
here, so `gs://bucket/run1` works wherever `runs/run1` does. etils.epath reads gs:// through
tf.io.gfile when TensorFlow is installed, otherwise through fsspec, which needs gcsfs (the
`gcs` and `tpu` extras); Orbax and Grain use the same epath paths.

A bucket path is checked once (`check`) before anything is written: a missing package, an
unreachable storage endpoint or missing credentials is a StorageError of one line within
seconds, instead of a long retry loop or a local folder named `gs:`.
"""

from __future__ import annotations

import builtins
import os
import socket
import threading
import uuid
from typing import Any, Callable

from etils import epath

# scheme -> (the fsspec package epath needs without TensorFlow, the endpoint it talks to)
REMOTE = {"gs": ("gcsfs", "storage.googleapis.com"), "s3": ("s3fs", "s3.amazonaws.com"),
          "az": ("adlfs", "blob.core.windows.net"), "hf": ("huggingface_hub", "huggingface.co")}
_checked: set[str] = set()


class StorageError(ValueError):
  """A path cannot be used (missing package, no credentials, unreachable); one line."""


def scheme(p) -> str | None:
  """"gs" for gs://..., None for a local path."""
  text = os.fspath(p) if not isinstance(p, str) else p
  head, sep, _ = text.partition("://")
  return head if sep and head in REMOTE else None


def is_remote(p) -> bool:
  return scheme(p) is not None


def path(p) -> epath.Path:
  """An epath.Path: bucket URIs kept as they are, local paths with ~ expanded."""
  if isinstance(p, epath.Path):
    return p
  text = os.fspath(p)
  return epath.Path(text if is_remote(text) else os.path.expanduser(text))


def _timeout_s() -> float:
  raw = os.environ.get("T6_STORAGE_TIMEOUT_S", "20")
  try:
    return float(raw)
  except ValueError:
    raise StorageError(f"T6_STORAGE_TIMEOUT_S={raw!r} must be a number of seconds") from None


def _within(fn: Callable[[], Any], seconds: float) -> tuple[bool, Any, BaseException | None]:
  """(finished, result, error) of fn() run in a daemon thread for at most `seconds`."""
  out: dict = {}

  def call():
    try:
      out["result"] = fn()
    except BaseException as e:  # noqa: BLE001 - reported to the caller
      out["error"] = e

  thread = threading.Thread(target=call, daemon=True)
  thread.start()
  thread.join(seconds)
  return not thread.is_alive(), out.get("result"), out.get("error")


def _brief(error: BaseException) -> str:
  text = " ".join(f"{type(error).__name__}: {error}".split())
  return text if len(text) <= 200 else text[:200] + " ..."


def _tensorflow_installed() -> bool:
  import importlib.util
  return importlib.util.find_spec("tensorflow") is not None


def check(p, what: str = "path") -> None:
  """Fails fast (StorageError, one line) if bucket path `p` cannot be used from here; local
  paths and buckets already checked pass at once. `what` names the setting in the message."""
  s = scheme(p)
  if s is None:
    return
  text = os.fspath(p)
  bucket = text.split("://", 1)[1].split("/", 1)[0]
  key = f"{s}://{bucket}"
  if key in _checked:
    return
  package, host = REMOTE[s]
  where = f"{what}={text}"
  if not _tensorflow_installed():
    import importlib.util
    if importlib.util.find_spec(package) is None:
      extra = " (pip install '.[gcs]')" if s == "gs" else ""
      raise StorageError(f"{where}: {s}:// paths need the {package} package, which is not "
                         f"installed; pip install {package}{extra}")
  seconds = _timeout_s()
  done, _, error = _within(lambda: socket.getaddrinfo(host, 443), min(seconds, 10.0))
  if not done or error is not None:
    why = "no answer" if not done else _brief(error)
    raise StorageError(f"{where}: cannot reach {host} ({why}); this machine is offline or its "
                       f"network blocks the storage service; use a local path or run where "
                       f"{s}:// is reachable")
  if s == "gs":
    def credentials():
      import google.auth
      return google.auth.default()
    done, _, error = _within(credentials, seconds)
    if done and error is not None:
      raise StorageError(f"{where}: no Google Cloud credentials ({_brief(error)}); run `gcloud "
                         f"auth application-default login`, or run on a VM whose service "
                         f"account may use the bucket")
  done, _, error = _within(lambda: epath.Path(key).exists(), seconds)
  if not done:
    raise StorageError(f"{where}: {key} gave no answer within {seconds:.0f} s "
                       f"(T6_STORAGE_TIMEOUT_S); check the network and the bucket name")
  if error is not None:
    raise StorageError(f"{where}: cannot access {key}: {_brief(error)}")
  _checked.add(key)


# --------------------------------------------------------------------------------------------
# Files


def exists(p) -> bool:
  return path(p).exists()


def isdir(p) -> bool:
  return path(p).is_dir()


def makedirs(p) -> epath.Path:
  """Creates the folder and its parents (a no-op on object stores without folders)."""
  q = path(p)
  q.mkdir(parents=True, exist_ok=True)
  return q


def listdir(p) -> list[str]:
  """Names in a folder, sorted."""
  return sorted(child.name for child in path(p).iterdir())


def glob(pattern: str) -> list[str]:
  """Paths matching a glob pattern (`*`, `?`, `[...]`, `**` in any component), sorted."""
  text = os.fspath(pattern)
  if not any(c in text for c in "*?["):
    return [text] if exists(text) else []
  s = scheme(text)
  if s is None:
    import glob as glob_lib
    return sorted(glob_lib.glob(os.path.expanduser(text), recursive=True))
  # The longest folder before the first wildcard, then matched one component at a time
  # (object-store listings); `**` is left to the backend's own glob.
  parts = text.split("/")
  first = next(i for i, part in enumerate(parts) if any(c in part for c in "*?["))
  base = path("/".join(parts[:first]))
  if "**" in parts[first:]:
    return sorted(os.fspath(m) for m in base.glob("/".join(parts[first:])))
  import fnmatch
  found = [base]
  for part in parts[first:]:
    found = [child for folder in found if folder.is_dir() for child in folder.iterdir()
             if fnmatch.fnmatchcase(child.name, part)]
  return sorted(os.fspath(m) for m in found)


def open(p, mode: str = "r"):  # noqa: A001 - the file-open of this module
  """A file object for reading or writing; folders of a written file are created."""
  q = path(p)
  if any(c in mode for c in "wa") and not is_remote(q):
    q.parent.mkdir(parents=True, exist_ok=True)
  return q.open(mode)


def read_text(p) -> str:
  return path(p).read_text()


def read_bytes(p) -> bytes:
  return path(p).read_bytes()


def write_text(p, text: str, *, atomic: bool = True) -> None:
  write_bytes(p, text.encode("utf-8"), atomic=atomic)


def write_bytes(p, data: bytes, *, atomic: bool = True) -> None:
  """Writes a whole file. Locally with `atomic`, into a temporary file then renamed, so a
  reader (or a kill) never sees half of it; an object store's upload is atomic already."""
  q = path(p)
  if is_remote(q) or not atomic:
    if not is_remote(q):
      q.parent.mkdir(parents=True, exist_ok=True)
    q.write_bytes(data)
    return
  q.parent.mkdir(parents=True, exist_ok=True)
  tmp = q.parent / f".{q.name}.tmp-{uuid.uuid4().hex[:8]}"
  try:
    tmp.write_bytes(data)
    os.replace(tmp, q)
  finally:
    if tmp.exists():
      tmp.unlink()


def copy(src, dst) -> None:
  """Copies one file (any mix of local and bucket paths), streamed in 16 MiB pieces; a local
  destination is written atomically."""
  import shutil
  if is_remote(dst):
    with path(src).open("rb") as fin, path(dst).open("wb") as fout:
      shutil.copyfileobj(fin, fout, 16 << 20)
    return
  q = path(dst)
  q.parent.mkdir(parents=True, exist_ok=True)
  tmp = os.fspath(q.parent / f".{q.name}.tmp-{uuid.uuid4().hex[:8]}")
  try:
    with path(src).open("rb") as fin, builtins.open(tmp, "wb") as fout:
      shutil.copyfileobj(fin, fout, 16 << 20)
    os.replace(tmp, q)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def remove(p) -> None:
  q = path(p)
  if q.exists():
    q.unlink()


def join(p, *parts: str) -> str:
  """A child path as a string (bucket URIs keep their scheme)."""
  return os.fspath(path(p).joinpath(*parts))


def size(p) -> int:
  """A file's size in bytes."""
  return int(path(p).stat().length) if is_remote(p) else os.path.getsize(path(p))


def walk_files(p) -> list[str]:
  """Every file below a folder, recursively, sorted."""
  root = path(p)
  if not is_remote(root):
    return sorted(os.path.join(r, f) for r, _, fs in os.walk(root) for f in fs)
  found, folders = [], [root]
  while folders:
    for child in folders.pop().iterdir():
      (folders if child.is_dir() else found).append(child)
  return sorted(os.fspath(f) for f in found)


def rmtree(p) -> None:
  """Removes a folder and everything in it."""
  q = path(p)
  if q.exists():
    q.rmtree()


def local_copy(p, cache_dir) -> str:
  """A local path holding the bytes of `p`: `p` itself when local, else a copy under
  `<cache_dir>/remote/` made once (for readers that need a local file: memory maps,
  ArrayRecord). A copy whose size differs from the source is made again."""
  if not is_remote(p):
    return os.fspath(p)
  if is_remote(cache_dir):
    raise StorageError(f"data.cache_dir={cache_dir} must be a local folder: it holds local "
                       f"copies of {scheme(p)}:// data for memory maps")
  import hashlib
  text = os.fspath(p)
  digest = hashlib.sha256(text.encode()).hexdigest()[:12]
  target = os.path.join(os.path.expanduser(os.fspath(cache_dir)), "remote", digest,
                        os.path.basename(text.rstrip("/")))
  if os.path.isfile(target) and os.path.getsize(target) == size(text):
    return target
  copy(text, target)
  return target
