"""Writing files so that a reader (another process, a crash and a restart) never sees half of
one: write a temporary file next to the target, then rename it over the target."""

from __future__ import annotations

import json
import os
from typing import Any, Callable


def atomic_save(path: str, write: Callable[[str], None]) -> None:
  """Calls `write(tmp_path)` and renames the result to `path` (creating its directory)."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  write(tmp)
  os.replace(tmp, path)


def save_json(path: str, obj: Any, indent: int | None = None) -> None:
  """`obj` as JSON at `path`, atomically."""
  def write(tmp):
    with open(tmp, "w") as f:
      json.dump(obj, f, indent=indent)
  atomic_save(path, write)
