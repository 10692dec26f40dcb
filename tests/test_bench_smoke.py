"""The benchmark scripts run end to end on the CPU with tiny configs (their GPU figures come
from the same code paths). Each script's main() runs in the test's process, with the flags a
user would type: a process of its own per script would spend most of its time importing jax
again. train_table.py starts train_throughput.py in processes of its own, as it does for a user.
"""

import contextlib
import copy
import importlib.util
import io
import os
import pkgutil
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPTS = {
    "cross_entropy": (["bench/cross_entropy.py", "--tokens", "8", "--vocab", "300", "--calls",
                       "2", "--grad"], "the kernel's statistics, XLA's gradient pass"),
    "decode": (["bench/decode.py", "--tiny", "--no_write", "--models", "t6-small,gqa-small",
                "--batches", "2", "--contexts", "256", "--step_tuning", "num_warps=2"],
               "| t6-small (tiny) | 2 | 256 |"),
    "decode_profile": (["bench/decode_profile.py", "--tiny"], "ms/step untraced"),
    "gemv": (["bench/gemv.py", "--config", "tiny", "--calls", "2", "--chain", "2", "--matrices", "packed"],
             "gemv kernel, stored (N, K)"),
    "pdl_chain": (["bench/pdl_chain.py", "--lower", "--kernels", "2", "--stages", "2",
                   "--modes", "plain,late"], "late, 2 stages: lowered for CUDA"),
    "grid_barrier": (["bench/grid_barrier.py", "--lower", "--stages", "2", "--mib", "1",
                      "--modes", "persistent"], "persistent, 1 MiB stages: lowered for CUDA"),
    "persistent_mlp": (["bench/persistent_mlp.py", "--config", "tiny", "--check"],
                       "max |persistent - two kernels| = 0"),
    "prefill": (["bench/prefill.py", "--tiny", "--models", "tpa", "--lengths", "600",
                 "--repeats", "1"], "chunks of 512"),
    "sampling": (["bench/sampling.py", "--batches", "2", "--vocab", "300", "--steps", "2",
                  "--repeats", "1"], "| top-p cut alone: bisection |"),
    "tpa_contract": (["bench/tpa_contract.py", "--config", "tiny", "--batch", "1", "--seq_len",
                      "8", "--reps", "1", "--calls", "1", "--sweep", "rows=64", "cols=4",
                      "num_warps=1"], "fastest: forward"),
    "train_kernels": (["bench/train_kernels.py", "--config", "tiny", "--batch", "1",
                       "--seq_len", "16", "--reps", "1", "--calls", "1", "--sweep",
                       "num_warps=4", "block=4096", "elements=4096", "rows=16"],
                      "fastest packed_grad"),
    "train_table": (["bench/train_table.py", "--presets", "tiny:8", "--seq_len", "32", "--steps",
                     "1", "--warmup", "1", "--variants", "triton=train.gpu_gemm=triton"],
                    "| tiny | 8 |"),
}


@contextlib.contextmanager
def script_module(path: str):
  """The module of the script at PATH (from the repository root), loaded as `python PATH`
  would: the script's folder first on sys.path while the block runs."""
  folder = os.path.join(ROOT, os.path.dirname(path))
  spec = importlib.util.spec_from_file_location(f"bench_{os.path.basename(path)[:-3]}",
                                                os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(spec)
  sys.path.insert(0, folder)
  try:
    spec.loader.exec_module(module)
    yield module
  finally:
    sys.path.remove(folder)


def run_script(path: str, argv: list[str]) -> tuple[int, str]:
  """`python PATH ARGV...` from the repository root, in this process: (exit code, stdout)."""
  out = io.StringIO()
  with contextlib.chdir(ROOT), contextlib.redirect_stdout(out), script_module(path) as module:
    rc = module.main(argv)
  return rc or 0, out.getvalue()


@pytest.fixture
def kernel_tunings():
  """The kernels' TUNING tables as they were: a script's `--step_tuning`-style flags set them
  for the rest of its process, which here is the test worker's."""
  import t6_jax.kernels as kernels
  modules = [importlib.import_module(f"{kernels.__name__}.{info.name}")
             for info in pkgutil.iter_modules(kernels.__path__)]
  saved = {(m, k): copy.deepcopy(v) for m in modules for k, v in vars(m).items()
           if k.endswith("TUNING") and isinstance(v, dict)}
  yield
  for (module, key), table in saved.items():
    getattr(module, key).clear()
    getattr(module, key).update(table)


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_bench_runs(name, kernel_tunings):
  path, *argv = SCRIPTS[name][0]
  rc, stdout = run_script(path, argv)
  assert rc == 0, stdout[-2000:]
  assert SCRIPTS[name][1] in stdout, stdout[-2000:]
  assert "failed" not in stdout


def test_train_table_reports_the_exception_line():
  """A failed run's cell names its exception, not the note jax prints after a traceback."""
  text = ("Traceback (most recent call last):\n  File \"x.py\", line 1\n"
          "jax.errors.JaxRuntimeError: NOT_FOUND: no stream\n--------------------\n"
          "For simplicity, JAX has removed its internal frames from the traceback.\n")
  with script_module("bench/train_table.py") as module:
    assert module._error_line(text) == "jax.errors.JaxRuntimeError: NOT_FOUND: no stream"
    assert module._error_line("compiling\nkilled\n") == "killed"


def test_train_table_env_settings():
  """`env:NAME=VALUE` in a variant sets that run's environment, not a config key."""
  with script_module("bench/train_table.py") as module:
    overrides, env = module.split_settings(
        ["train.gpu_gemm=triton", "env:XLA_FLAGS=--xla_a=1 ", "env:FOO="])
    assert overrides == ["train.gpu_gemm=triton"]
    assert env == {"XLA_FLAGS": "--xla_a=1 ", "FOO": ""}
    with pytest.raises(SystemExit, match="env:NAME=VALUE"):
      module.split_settings(["env:XLA_FLAGS"])
