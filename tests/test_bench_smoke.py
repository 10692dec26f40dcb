"""The benchmark scripts run end to end on the CPU with tiny configs (their GPU figures come
from the same code paths), each in its own process as a user runs them."""

import os
import subprocess
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
    "prefill": (["bench/prefill.py", "--tiny", "--models", "tpa", "--lengths", "600",
                 "--repeats", "1"], "chunks of 512"),
    "tpa_contract": (["bench/tpa_contract.py", "--config", "tiny", "--batch", "1", "--seq_len",
                      "8", "--reps", "1", "--calls", "1", "--sweep", "rows=64", "cols=4",
                      "num_warps=1"], "fastest: forward"),
    "train_kernels": (["bench/train_kernels.py", "--config", "tiny", "--batch", "1",
                       "--seq_len", "16", "--reps", "1", "--calls", "1", "--sweep",
                       "num_warps=4", "block=4096", "elements=4096", "rows=16"],
                      "fastest packed_grad"),
    "train_table": (["bench/train_table.py", "--presets", "tiny:8", "--steps", "1",
                     "--warmup", "1", "--variants", "triton=train.gpu_gemm=triton"],
                    "| tiny | 8 |"),
}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_bench_runs(name):
  argv, expect = SCRIPTS[name]
  env = dict(os.environ, PYTHONPATH=ROOT)
  done = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  assert expect in done.stdout, done.stdout[-2000:]
  assert "failed" not in done.stdout
