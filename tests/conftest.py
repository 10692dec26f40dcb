"""Test session setup: 8 forced host devices (for mesh tests), CPU only, absl flags parsed."""

import os

# Tiny test programs are compile-bound: skip XLA's expensive CPU backend passes (about 2x
# faster compiles; every comparison in the suite compiles both sides with the same flags).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0"
                           " --xla_llvm_disable_expensive_passes=true").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()  # Grain workers read absl flags outside an absl app
