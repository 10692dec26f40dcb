"""Joining the processes of a multi-host job (TPU pod slice, SLURM, Open MPI, or the explicit
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID environment), with timeouts so that
a dead process stops the job instead of hanging the others."""

from __future__ import annotations

import os
import sys
import threading

import jax

# jax.distributed.initialize keyword: (environment variable, default seconds)
TIMEOUTS = {"initialization_timeout": ("T6_INIT_TIMEOUT_S", 300),
            "heartbeat_timeout_seconds": ("T6_HEARTBEAT_TIMEOUT_S", 100),
            "shutdown_timeout_seconds": ("T6_SHUTDOWN_TIMEOUT_S", 300)}


def timeouts() -> dict[str, int]:
  """jax.distributed's timeouts in seconds: T6_INIT_TIMEOUT_S (every process has joined),
  T6_HEARTBEAT_TIMEOUT_S (a process silent this long is gone: the others stop with an error
  naming it) and T6_SHUTDOWN_TIMEOUT_S (the barrier at exit)."""
  out = {}
  for key, (var, default) in TIMEOUTS.items():
    raw = os.environ.get(var, str(default)).strip()
    if not raw.isdigit() or int(raw) <= 0:
      raise ValueError(f"{var}={raw!r} must be a positive whole number of seconds")
    out[key] = int(raw)
  return out


def initialize(force: bool = False) -> None:
  """jax.distributed.initialize() when this process is one of several.

  Explicit: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (multi-node GPU).
  Detected: Cloud TPU pod slices (several TPU worker hostnames), Multislice jobs (the
  MEGASCALE_* environment of several slices), SLURM and Open MPI jobs with more than one
  task. `force` (train.py --distributed) lets JAX auto-detect everything else.
  """
  env = os.environ
  if jax.distributed.is_initialized():
    return
  num = int(env.get("JAX_NUM_PROCESSES", "1"))
  if env.get("JAX_COORDINATOR_ADDRESS") and num > 1:
    jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"], num,
                               int(env.get("JAX_PROCESS_ID", "0")), **timeouts())
  elif (force or "," in env.get("TPU_WORKER_HOSTNAMES", "")
        or int(env.get("MEGASCALE_NUM_SLICES", "1") or "1") > 1
        or int(env.get("SLURM_NTASKS", "1")) > 1
        or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1):
    jax.distributed.initialize(**timeouts())


# Signs, in a runtime error's text, that a collective lost a peer process (Gloo on CPU, NCCL
# and ICI/DCN transports, the coordination service).
_PEER_LOST = ("gloo", "connection closed", "connection reset", "heartbeat", "unavailable",
              "nccl", "socket closed", "peer", "coordination service", "barrier")


def _missing_processes(wait_s: float) -> tuple[list[int] | None, str]:
  """Ids of the processes the coordination service counts as gone ([] if none), or None and
  why not, waiting at most `wait_s` (the service needs a heartbeat timeout to decide)."""
  from jax._src import distributed as jax_distributed
  client = jax_distributed.global_state.client
  if client is None:
    return None, "jax.distributed is not initialized"
  ids = list(range(jax.process_count()))
  answer: dict = {}

  def ask():
    try:
      answer["live"] = client.get_live_nodes(ids)
    except Exception as e:  # noqa: BLE001 - the coordinator itself may be gone
      answer["error"] = " ".join(str(e).split())[:200]

  thread = threading.Thread(target=ask, daemon=True)
  thread.start()
  thread.join(wait_s)
  if "live" in answer:
    return [i for i in ids if i not in answer["live"]], ""
  if "error" in answer:
    return None, f"the coordinator (process 0) does not answer: {answer['error']}"
  return None, f"the coordinator gave no answer within {wait_s:.0f} s"


def exit_if_peer_lost(error: BaseException, workdir: str = "") -> None:
  """In a job of several processes, a collective that failed because another process died
  ends this one at once (exit status 1) with a line naming the dead process, instead of a
  traceback followed by a wait at jax.distributed's exit barrier. Returns for other errors."""
  if jax.process_count() <= 1 or isinstance(error, (KeyboardInterrupt, SystemExit)):
    return
  text = " ".join(str(error).split())
  if not any(sign in text.lower() for sign in _PEER_LOST):
    return
  me, count = jax.process_index(), jax.process_count()
  heartbeat = timeouts()["heartbeat_timeout_seconds"]
  print(f"error: process {me} of {count}: a step across processes failed "
        f"({text[:160]}); asking the coordinator which process is gone (up to {heartbeat} s, "
        f"T6_HEARTBEAT_TIMEOUT_S)", file=sys.stderr, flush=True)
  missing, why = _missing_processes(heartbeat + 5.0)
  if missing:
    who = ", ".join(map(str, missing))
    what = f"process{'es' if len(missing) > 1 else ''} {who} of {count} stopped (no heartbeat)"
  elif missing == []:
    what = "every process still answers the coordinator; see the other processes' logs"
  else:
    what = why
  resume = (f"; rerun all {count} processes to resume from the newest complete checkpoint in "
            f"{workdir}" if workdir else "")
  print(f"error: the job lost a process: {what}{resume}", file=sys.stderr, flush=True)
  # os._exit: the normal exit path waits at jax.distributed's shutdown barrier for the
  # process that is gone (T6_SHUTDOWN_TIMEOUT_S) and then aborts with a stack dump.
  os._exit(1)
