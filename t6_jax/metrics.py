"""Console progress, TensorBoard and JSONL metric writers. Only the primary process writes.

`Metrics(workdir, ...)` owns a tqdm bar (loss, tokens/s, ETA), a tensorboardX SummaryWriter
under `workdir/tb` and `workdir/metrics.jsonl` (one JSON object per logged step, appended, so
a resumed run continues the same file).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import tqdm


def _plain(value: Any):
  """JSON-able scalar: numpy/jax scalars to float or int, non-finite floats kept as strings."""
  if hasattr(value, "item"):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value


class Metrics:

  def __init__(self, workdir: str, *, total_steps: int, start_step: int = 0,
               primary: bool = True, tensorboard: bool = True, progress: bool = True):
    self.primary = primary
    self.jsonl = None
    self.tb = None
    self.bar = None
    if not primary:
      return
    os.makedirs(workdir, exist_ok=True)
    self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    if tensorboard:
      from tensorboardX import SummaryWriter
      self.tb = SummaryWriter(os.path.join(workdir, "tb"))
    if progress:
      self.bar = tqdm.tqdm(total=total_steps, initial=start_step, unit="step",
                           dynamic_ncols=True, file=sys.stdout, smoothing=0.1,
                           disable=None)  # None: off when stdout is not a terminal

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
    if self.tb is not None:
      for key, value in values.items():
        if isinstance(value, (int, float)):
          self.tb.add_scalar(key, value, step)

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
    self.bar = self.tb = self.jsonl = None
