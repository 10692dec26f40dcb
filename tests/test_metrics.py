"""The metric writers' start-up: TensorBoard scalars without importing torch."""

import importlib.util
import os
import subprocess
import sys

import pytest

from multiproc import REPO

SCRIPT = """
import glob, os, sys
from t6_jax.metrics import Metrics
m = Metrics(sys.argv[1], total_steps=2, progress=False)
m.write(1, {"loss": 1.5})
m.close()
assert "torch" not in sys.modules, "tensorboardX imported torch"
events = glob.glob(os.path.join(sys.argv[1], "tb", "events.out.tfevents.*"))
assert len(events) == 1 and b"loss" in open(events[0], "rb").read(), events
import torch  # refused only while tensorboardX was imported
print("ok", torch.__name__)
"""


def test_tensorboard_scalars_are_written_without_importing_torch(tmp_path):
  if importlib.util.find_spec("torch") is None:
    pytest.skip("torch is not installed: nothing to keep out")
  env = {k: v for k, v in os.environ.items() if k != "PYTEST_XDIST_WORKER"}
  env["PYTHONPATH"] = REPO
  done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 0 and "ok torch" in done.stdout, done.stderr[-3000:]
