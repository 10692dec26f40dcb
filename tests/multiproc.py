"""Starts one job of N processes on this machine, the way a pod or a SLURM job runs them.

Every process gets JAX_COORDINATOR_ADDRESS=localhost:PORT, JAX_NUM_PROCESSES=N,
JAX_PROCESS_ID=i and its own forced CPU devices, so `jax.distributed.initialize` joins them
into one job of N x devices devices. A job of one process gets no coordinator at all (the
single-process reference). Output goes to one log file per process. Jobs given the same
`shared` folder reuse each other's compiled XLA programs (and Python bytecode, where the
installed packages have none and none may be written).

  job = Job(["train.py", "--config", "tiny", ...], processes=2, devices=4, logdir=tmp)
  results = job.wait(timeout=300)       # [Result(rc, output), ...] in process order
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The fast CPU compile flags of tests/conftest.py (both sides of every comparison use them).
FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def imports_from_source() -> bool:
  """Whether a started process would compile jax & co. from source at every import: the
  installed packages have no bytecode and none may be written (PYTHONDONTWRITEBYTECODE). That
  is about 4 s of CPU per process for jax, flax, orbax and grain alone."""
  if not os.environ.get("PYTHONDONTWRITEBYTECODE"):
    return False
  jax_init = importlib.util.find_spec("jax").origin
  return not os.path.exists(importlib.util.cache_from_source(jax_init))


def environment(process_id: int, processes: int, devices: int, port: int,
                shared: str | None = None, extra: dict | None = None) -> dict:
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
                              "PYTEST_", "SLURM_", "OMPI_", "TPU_WORKER", "MEGASCALE"))}
  env.update(PYTHONPATH=REPO, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {FAST_XLA}")
  if processes > 1:
    env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=str(processes),
               JAX_PROCESS_ID=str(process_id))
  if shared:
    # Every program is cached, however fast its compile (jax's defaults skip small ones).
    env.update(JAX_COMPILATION_CACHE_DIR=os.path.join(shared, "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
    if imports_from_source():
      # The first process compiles the modules into this folder; the others load them.
      del env["PYTHONDONTWRITEBYTECODE"]
      env["PYTHONPYCACHEPREFIX"] = os.path.join(shared, "bytecode")
  env.update(extra or {})
  return env


@dataclasses.dataclass
class Result:
  rc: int | None  # None: still running when the timeout ended the wait (then killed)
  output: str  # stdout and stderr together


class Job:
  """N processes of `python ARGS...` (ARGS[0] a script relative to the repository, or -c/-m)."""

  def __init__(self, args: list[str], *, processes: int = 2, devices: int = 4, logdir: str,
               name: str = "job", shared: str | None = None, env: dict | None = None):
    os.makedirs(logdir, exist_ok=True)
    port = free_port()
    self.name = name
    self.logs = [os.path.join(logdir, f"{name}.{i}.log") for i in range(processes)]
    self.procs = []
    for i in range(processes):
      with open(self.logs[i], "w") as log:
        self.procs.append(subprocess.Popen(
            [sys.executable, *args], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
            env=environment(i, processes, devices, port, shared, env)))

  def output(self, i: int) -> str:
    with open(self.logs[i], errors="replace") as f:
      return f.read()

  def signal(self, sig: int, which=None) -> None:
    for i in range(len(self.procs)) if which is None else which:
      if self.procs[i].poll() is None:
        os.kill(self.procs[i].pid, sig)

  def wait(self, timeout: float) -> list[Result]:
    """Waits for every process (at most `timeout` seconds in all); kills what is left."""
    deadline = time.time() + timeout
    for p in self.procs:
      try:
        p.wait(timeout=max(0.0, deadline - time.time()))
      except subprocess.TimeoutExpired:
        pass
    results = []
    for i, p in enumerate(self.procs):
      rc = p.poll()
      if rc is None:
        p.send_signal(signal.SIGKILL)
        p.wait()
      results.append(Result(rc, self.output(i)))
    return results

  def check(self, results: list[Result]) -> list[Result]:
    """Every process exited 0, or an AssertionError with the first failure's output."""
    for i, r in enumerate(results):
      if r.rc != 0:
        raise AssertionError(f"{self.name}: process {i} of {len(results)} exited with {r.rc}:\n"
                             + r.output[-4000:])
    return results

  def kill(self) -> None:
    for p in self.procs:
      if p.poll() is None:
        p.kill()
        p.wait()


def run(args: list[str], *, processes: int = 2, devices: int = 4, logdir: str,
        name: str = "job", timeout: float = 300, shared: str | None = None,
        env: dict | None = None, check: bool = True) -> list[Result]:
  """Starts a Job and waits for it; with `check` every process must exit 0."""
  job = Job(args, processes=processes, devices=devices, logdir=logdir, name=name,
            shared=shared, env=env)
  results = job.wait(timeout)
  return job.check(results) if check else results
