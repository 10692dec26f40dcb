"""Keeps Orbax's and TensorStore's harmless noise off the console, and nothing else.

Three kinds of message reach users without saying anything they can act on:

* Orbax warns `Metadata file does not exist` / `Failed to get item metadata` whenever the array
  metadata of one item (not a whole step) is read, which is how we check a checkpoint's shapes
  before reading it; when the metadata really is missing we raise our own error naming the step.
* When a read of a damaged step fails, TensorStore reads of it that are still in flight finish
  later on a closed event loop: `RuntimeError: Event loop is closed` tracebacks (reported as
  unraisable exceptions raised by asyncio's closed-loop check, which only abandoned work
  reaches) and, once the step is given up, asyncio's `Future exception was never retrieved`
  records holding `OUT_OF_RANGE: Error opening "zarr" driver` (also when the garbage collector
  logs them while the step's metadata is still being read, before the step is given up). The
  step is reported as damaged by our own message.

Each filter drops only those records; every other warning, log record and unraisable error is
passed on unchanged.
"""

from __future__ import annotations

import logging
import sys
import threading

_ORBAX_ITEM_METADATA = ("Metadata file does not exist", "Failed to get item metadata")
_ABANDONED = ("Future exception was never retrieved", "Task exception was never retrieved")
# What a TensorStore read of a damaged array fails with: such a record is abandoned-read noise
# even when the garbage collector logs it before the step is given up (`abandoned_reads`).
_DAMAGED_READ = 'Error opening "zarr" driver'

_lock = threading.Lock()
_installed = False
_damage_seen = False


class _Filter(logging.Filter):

  def filter(self, record: logging.LogRecord) -> bool:
    message = str(record.msg)
    if message.startswith(_ORBAX_ITEM_METADATA):
      return False
    if message.startswith(_ABANDONED) and (_damage_seen or _DAMAGED_READ in message):
      return False
    return True


def _is_abandoned_read(unraisable) -> bool:
  """A callback scheduled onto an asyncio loop that was already closed: work nobody waits
  for any more (Orbax closes its loop when it gives up on a damaged step)."""
  error, tb = unraisable.exc_value, unraisable.exc_traceback
  if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
    return False
  while tb is not None and tb.tb_next is not None:
    tb = tb.tb_next
  return tb is not None and tb.tb_frame.f_code.co_name == "_check_closed"


def install() -> None:
  """Adds the filters (once per process); called when t6_jax.checkpoint is imported."""
  global _installed
  with _lock:
    if _installed:
      return
    _installed = True
    for name in ("absl", "asyncio"):
      logging.getLogger(name).addFilter(_Filter())
    previous = sys.unraisablehook

    def hook(unraisable):
      if _is_abandoned_read(unraisable):
        return
      previous(unraisable)

    sys.unraisablehook = hook


def abandoned_reads() -> None:
  """Called when a step is given up as damaged: its reads still in flight end in noise."""
  global _damage_seen
  install()
  _damage_seen = True
