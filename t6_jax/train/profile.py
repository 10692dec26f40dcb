"""A profiler trace of a few training steps (train.profile_steps), for TensorBoard and Perfetto.

`StepProfiler` starts `jax.profiler` before step `first` is dispatched and stops it once step
`first + count - 1` has finished on the device, so the trace holds whole steps and no
compilation. Each traced step is marked with a `StepTraceAnnotation`, which TensorBoard's
profile plugin uses for its step-time view. The trace goes to TRACE_DIR/plugins/profile/<time>/
(the plugin's layout: point TensorBoard at the run's tb/ folder) together with a Perfetto file
(perfetto_trace.json.gz, for ui.perfetto.dev or `bench/train_profile.py --trace`).
"""

from __future__ import annotations

import contextlib

import jax


class StepProfiler:

  def __init__(self, trace_dir: str | None, first: int, count: int, log=print):
    """trace_dir None or count 0: no trace (other processes than the first, or not asked)."""
    self.trace_dir = trace_dir if count > 0 else None
    self.first, self.last = first, first + count - 1
    self.log = log
    self.active = False

  def step(self, n: int):
    """A context around the dispatch of step n: starts the trace at the first traced step."""
    if self.trace_dir is None or not self.first <= n <= self.last:
      return contextlib.nullcontext()
    if not self.active:
      jax.profiler.start_trace(self.trace_dir, create_perfetto_trace=True)
      self.active = True
    return jax.profiler.StepTraceAnnotation("train", step_num=n)

  def dispatched(self, n: int, outputs) -> None:
    """After step n's dispatch: at the last traced step, waits for it and stops the trace."""
    if self.active and n == self.last:
      jax.block_until_ready(outputs)
      self.stop()
      self.log(f"profile of steps {self.first}-{self.last} written under "
               f"{self.trace_dir}/plugins/profile (TensorBoard's profile plugin; "
               f"perfetto_trace.json.gz for ui.perfetto.dev)")

  def stop(self) -> None:
    if self.active:
      self.active = False
      jax.profiler.stop_trace()
