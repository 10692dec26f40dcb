"""Console progress, TensorBoard, JSONL and (optionally) W&B metric writers. Only the primary
process writes.

`Metrics(workdir, ...)` owns a tqdm bar (loss, tokens/s, ETA), a tensorboardX SummaryWriter
under `workdir/tb` and `workdir/metrics.jsonl` (one JSON object per logged step, appended, so
a resumed run continues the same file). With a bucket workdir (gs://...), both are written to a
local folder and uploaded every `sync_s` seconds and at close(): objects in a bucket cannot be
appended to, and tensorboardX's own gs:// writer needs google-cloud-storage. With
`wandb=dict(project=..., entity=..., name=..., run_id=..., config=...)` the same scalars also go
to a Weights & Biases run, resumed under the same id when the training run resumes.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
import uuid
from typing import Any

import tqdm

from t6_jax import storage


def device_peak_bytes(devices) -> float | None:
  """The largest peak of device memory in use over `devices`, where the backend reports it
  (GPU, TPU); None where none does (CPU)."""
  peaks = []
  for d in devices:
    try:
      stats = d.memory_stats() or {}
    except Exception:  # noqa: BLE001 (backends without memory statistics)
      stats = {}
    if "peak_bytes_in_use" in stats:
      peaks.append(stats["peak_bytes_in_use"])
  return float(max(peaks)) if peaks else None


def _plain(value: Any):
  """JSON-able scalar: numpy/jax scalars to float or int, non-finite floats kept as strings."""
  if hasattr(value, "item"):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value


def summary_writer_class():
  """tensorboardX's SummaryWriter, imported without torch. tensorboardX imports torch whenever
  it is installed, only to accept torch tensors (never passed here); that import costs about
  2 s of every process start, so it is refused for the duration of tensorboardX's import."""
  if "tensorboardX" not in sys.modules and "torch" not in sys.modules:
    sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX expects
    try:
      importlib.import_module("tensorboardX")
    finally:
      del sys.modules["torch"]
  from tensorboardX import SummaryWriter
  return SummaryWriter


def import_wandb():
  """The wandb module, or a ValueError saying how to get it (train.wandb_project is set)."""
  try:
    import wandb
  except ImportError as e:
    raise ValueError("train.wandb_project is set but wandb is not installed; pip install wandb "
                     "(WANDB_MODE=offline logs without a network), or leave "
                     "train.wandb_project empty") from e
  return wandb


class Metrics:

  def __init__(self, workdir: str, *, total_steps: int, start_step: int = 0,
               primary: bool = True, tensorboard: bool = True, progress: bool = True,
               sync_s: float = 60.0, wandb: dict | None = None):
    self.primary = primary
    self.jsonl = None
    self.tb = None
    self.wb = None
    self.bar = None
    self.workdir = os.fspath(workdir)
    self.sync_s = sync_s
    self._mirror = None  # local folder uploaded to a bucket workdir
    self._synced = time.time()
    if not primary:
      return
    local = self.workdir
    if storage.is_remote(self.workdir):
      storage.check(self.workdir, "train.workdir")
      self._mirror = local = tempfile.mkdtemp(prefix="t6-metrics-")
      remote_jsonl = storage.join(self.workdir, "metrics.jsonl")
      if storage.exists(remote_jsonl):  # a resumed run continues the same file
        storage.copy(remote_jsonl, os.path.join(local, "metrics.jsonl"))
    os.makedirs(local, exist_ok=True)
    self.jsonl = open(os.path.join(local, "metrics.jsonl"), "a")
    if tensorboard:
      SummaryWriter = summary_writer_class()
      # A unique suffix: two writers started in the same second on one host must not share an
      # event file name, or the second upload would replace the first one's file.
      self.tb = SummaryWriter(os.path.join(local, "tb"),
                              filename_suffix=f".{uuid.uuid4().hex[:8]}")
    if wandb is not None:
      # Its own files stay out of a bucket workdir's mirror (which is uploaded as it is).
      folder = local if self._mirror is None else tempfile.mkdtemp(prefix="t6-wandb-")
      self.wb = import_wandb().init(
          project=wandb["project"], entity=wandb.get("entity") or None, name=wandb["name"],
          id=wandb["run_id"], resume="allow", config=wandb.get("config"), dir=folder)
    if progress:
      self.bar = tqdm.tqdm(total=total_steps, initial=start_step, unit="step",
                           dynamic_ncols=True, file=sys.stdout, smoothing=0.1,
                           disable=None)  # None: off when stdout is not a terminal

  def local_dir(self, name: str) -> str | None:
    """Where this process writes the run's folder `name` (the primary process's workdir, or
    its local mirror of a bucket workdir, uploaded with the metrics); None elsewhere."""
    if not self.primary:
      return None
    return os.path.join(self._mirror or self.workdir, name)

  def progress(self, step: int, **postfix) -> None:
    """Moves the bar to `step` and shows the given values (loss, tok/s)."""
    if self.bar is None:
      return
    self.bar.update(step - self.bar.n)
    self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v)
                          for k, v in postfix.items()}, refresh=False)

  def write(self, step: int, values: dict[str, Any], prefix: str = "") -> None:
    """One JSONL record {"step": step, "time": unix, key: value} and TensorBoard scalars."""
    if not self.primary:
      return
    values = {prefix + k: _plain(v) for k, v in values.items() if v is not None}
    self.jsonl.write(json.dumps({"step": step, "time": round(time.time(), 3), **values}) + "\n")
    self.jsonl.flush()
    scalars = {k: v for k, v in values.items() if isinstance(v, (int, float))}
    if self.tb is not None:
      for key, value in scalars.items():
        self.tb.add_scalar(key, value, step)
    if self.wb is not None:
      self.wb.log(scalars, step=step)
    if self._mirror is not None and time.time() - self._synced >= self.sync_s:
      self.sync()

  def sync(self) -> None:
    """Uploads metrics.jsonl and this run's TensorBoard event files to a bucket workdir."""
    if self._mirror is None:
      return
    if self.tb is not None:
      self.tb.flush()
    if self.jsonl is not None:
      self.jsonl.flush()
    for root, _, files in os.walk(self._mirror):
      for name in files:
        local = os.path.join(root, name)
        rel = os.path.relpath(local, self._mirror).replace(os.sep, "/")
        storage.copy(local, storage.join(self.workdir, rel))
    self._synced = time.time()

  def print(self, text: str) -> None:
    """A line above the bar (or plain print without one)."""
    if not self.primary:
      return
    if self.bar is not None and not self.bar.disable:
      self.bar.write(text, file=sys.stdout)
    else:
      print(text, flush=True)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
    if self.tb is not None:
      self.tb.close()
    if self.jsonl is not None:
      self.jsonl.close()
    if self.wb is not None:
      self.wb.finish()
    self.bar = self.tb = self.jsonl = self.wb = None
    try:
      self.sync()
    finally:
      if self._mirror is not None:
        shutil.rmtree(self._mirror, ignore_errors=True)
      self._mirror = None
