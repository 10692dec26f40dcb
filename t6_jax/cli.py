"""What the entry points (train.py, eval.py, generate.py) share: one command-line convention,
a quiet start on machines without a TPU, and failures that end in one line.

  python train.py --config tiny --workdir runs/tiny train.steps=50
  python eval.py --workdir runs/tiny --no_tasks eval.max_batches=4
  python generate.py --workdir runs/tiny --prompt "ROMEO:" decode.temperature=0.8

`section.key=value` settings may stand anywhere among the flags. A failure prints
`error: <problem>; <fix>` on one line and exits non-zero; `--debug` (or T6_DEBUG=1) shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import sys
from typing import Callable, Sequence

GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips show up as PCI devices of this vendor


def add_common(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--debug", action="store_true",
                      help="show the traceback of a failure (also: T6_DEBUG=1)")
  parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                      help="settings, anywhere among the flags")


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
  """Parses flags with `section.key=value` settings anywhere among them (args.overrides)."""
  args, rest = parser.parse_known_args(argv)
  extra = [a for a in rest if a.startswith("-") or "=" not in a]
  if extra:
    parser.error(f"unrecognized arguments: {' '.join(extra)} (settings look like "
                 f"section.key=value; flags are listed by --help)")
  args.overrides = list(args.overrides) + rest
  return args


def note_unused(overrides: Sequence[str], program: str, sections: Sequence[str],
                keys: Sequence[str] = ()) -> list[str]:
  """Prints a note for each `section.key=value` setting that `program` does not read (say
  train.lr=3 given to generate.py), so that a setting with no effect is not taken for one
  that worked; returns them. `program` reads every key of `sections` and the dotted `keys`."""
  unused = [o for o in overrides
            if o.split(".", 1)[0] not in sections and o.split("=", 1)[0] not in keys]
  what = ", ".join(f"{s}.*" for s in sections) + " settings" + "".join(
      f" and {k}" for k in keys)
  for o in unused:
    print(f"note: {o} has no effect on {program}, which reads {what}", file=sys.stderr)
  return unused


def human_bytes(n: float) -> str:
  """A byte count for people: '3.11 GB', '41.2 MB', '512 B' (powers of 1000)."""
  for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
    if n >= size:
      return f"{n / size:.{2 if unit == 'GB' else 1}f} {unit}"
  return f"{int(n)} B"


def _tpu_present() -> bool:
  if any(os.environ.get(k) for k in ("TPU_NAME", "TPU_ACCELERATOR_TYPE", "JAX_FORCE_TPU_INIT")):
    return True
  for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(vendor) as f:
        if f.read().strip() == GOOGLE_PCI_VENDOR:
          return True
    except OSError:
      continue
  return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def _cuda_present() -> bool:
  plugin = any(importlib.util.find_spec(m) is not None
               for m in ("jax_cuda12_plugin", "jax_cuda13_plugin"))
  return plugin and bool(glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/nvidiactl"))


def quiet_startup() -> None:
  """With libtpu installed (the `tpu` extra, for AOT compiles) on a machine without a TPU,
  JAX would still start libtpu, which prints `Failed to find host bounds ...` and
  `TPU_WORKER_HOSTNAMES` errors. Naming the platforms that are there skips it. Call before
  JAX creates its backends; an explicit JAX_PLATFORMS is left alone. AOT compiles for a TPU
  topology load libtpu on their own and are not affected."""
  if "JAX_PLATFORMS" in os.environ or "jax" in sys.modules:
    return
  if importlib.util.find_spec("libtpu") is None or _tpu_present():
    return
  os.environ["JAX_PLATFORMS"] = "cuda,cpu" if _cuda_present() else "cpu"


def quiet_aot_startup() -> None:
  """For --aot_topology: compile on the CPU backend, and on a machine without a TPU give libtpu
  (loaded for the topology description) a host and an accelerator type, without which it
  prints `Failed to find host bounds` and `TPU_WORKER_HOSTNAMES` errors. Neither changes what
  is compiled: the topology is given explicitly (the reports are identical with and without)."""
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  if not _tpu_present():
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")


def _one_line(error: BaseException) -> str:
  text = " ".join(str(error).split()) or type(error).__name__
  return text


def run(main: Callable[[argparse.Namespace], int], parse_args: Callable, argv=None) -> int:
  """Parses, then runs `main(args)`; any failure becomes one line on stderr and exit code 2
  (bad input: settings, paths, checkpoints) or 1 (anything else)."""
  args = parse_args(argv)
  debug = args.debug or os.environ.get("T6_DEBUG", "") not in ("", "0")
  quiet_startup()
  if debug:
    return main(args)
  from t6_jax.checkpoint.trees import CheckpointError
  from t6_jax.config import ConfigError
  try:
    return main(args)
  except KeyboardInterrupt:
    print("error: interrupted", file=sys.stderr)
    return 130
  except (ConfigError, CheckpointError, FileNotFoundError, NotADirectoryError,
          IsADirectoryError, PermissionError, ValueError) as e:
    print(f"error: {_one_line(e)}", file=sys.stderr)
    return 2
  except Exception as e:  # noqa: BLE001 - the promise is one line, whatever failed
    print(f"error: {type(e).__name__}: {_one_line(e)} (rerun with --debug or T6_DEBUG=1 for "
          f"the traceback)", file=sys.stderr)
    return 1
