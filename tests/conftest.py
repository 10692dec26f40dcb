"""Test session setup: 8 forced host devices (for mesh tests), CPU only, absl flags parsed."""

import os

# Tiny test programs are compile-bound: skip XLA's expensive CPU backend passes (about 2x
# faster compiles; every comparison in the suite compiles both sides with the same flags).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0"
                           " --xla_llvm_disable_expensive_passes=true").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Tests build fresh jitted functions for the same tiny models, and both pytest-xdist workers
# build the same ones: jax's in-memory cache (keyed by the function object) misses them, its
# persistent cache (keyed by the program) does not. The first process to import this file (the
# xdist controller, whose environment the workers inherit) makes one cache folder for the run
# and removes it at the end; a cache the user set is left alone.
_RUN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import tempfile

  _RUN_CACHE = tempfile.mkdtemp(prefix="t6-jax-tests-jax-cache-")
  os.environ.update(JAX_COMPILATION_CACHE_DIR=_RUN_CACHE,
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")


def pytest_unconfigure(config):
  if _RUN_CACHE:
    import shutil
    shutil.rmtree(_RUN_CACHE, ignore_errors=True)

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()  # Grain workers read absl flags outside an absl app
