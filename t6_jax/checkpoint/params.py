"""Params-only checkpoints: `export_params` writes one, `load_params` reads params from any of
our checkpoint layouts.

Layouts (all Orbax, OCDBT format):

  run directory      WORKDIR/checkpoints/<step>/{state, data, meta}   written by Checkpointer
  step directory     WORKDIR/checkpoints/<step>                        one step of the above
  export directory   DIR/params, DIR/config.yaml, DIR/tokenizer.json   written by export_params

A train step holds params, optimizer state, step and RNG (item `state`), the Grain iterator
state (`data`) and the resolved config and tokenizer spec (`meta`, JSON). `load_params` reads
only the params out of `state` (Orbax partial restore), so it costs a third of a full restore.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
import yaml
from etils import epath

from t6_jax import config as config_lib
from t6_jax import storage
from t6_jax.checkpoint import quiet
from t6_jax.checkpoint.trees import (CheckpointError, CheckpointMismatchError, abstract_params,
                                     check_same_shapes, restore_target)
from t6_jax.config import Config, ModelConfig

CHECKPOINT_DIR = "checkpoints"  # under a run's workdir
STATE, DATA, META = "state", "data", "meta"  # items of a train step
EXPORT_PARAMS, CONFIG_FILE, TOKENIZER_FILE = "params", "config.yaml", "tokenizer.json"
FORMAT_VERSION = 1

quiet.install()


def say(message: str) -> None:
  """Messages a user must see (fallbacks, preemption) go to stderr, once per job."""
  if jax.process_index() == 0:
    print(f"[checkpoint] {message}", file=sys.stderr, flush=True)


def brief(error: BaseException, limit: int = 400) -> str:
  text = " ".join(f"{type(error).__name__}: {error}".split())
  return text if len(text) <= limit else text[:limit] + " ..."


# --------------------------------------------------------------------------------------------
# Writing


def _to_savable(params) -> Any:
  # Host numpy leaves are placed on a device so that every leaf restores as a jax.Array.
  return jax.tree.map(lambda x: jax.device_put(x) if isinstance(x, np.ndarray) else x, params)


def export_params(path: str, params: dict, config: Config, tokenizer_spec: dict | None,
                  *, overwrite: bool = False) -> str:
  """Writes a params-only checkpoint: PATH/params (Orbax), PATH/config.yaml, PATH/tokenizer.json.

  `params` is the nested dict of arrays the train state holds (sharded or not); its shapes are
  checked against `config.model` so a conversion bug fails here rather than at load time.
  Every process must call this (Orbax writes each process's shards). Returns the path.
  """
  storage.check(path, "export path")
  path = _absolute(path)
  check_same_shapes(abstract_params(config.model), params, prefix="params.",
                    where="the params being exported", cause="they do not fit config.model",
                    fix="export the params together with the config they were built for")
  target = storage.path(path) / EXPORT_PARAMS
  if target.exists() and not overwrite:
    raise CheckpointError(f"{target} already exists; pass overwrite=True or choose a new path")
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(target, _to_savable(params), force=overwrite)
  checkpointer.wait_until_finished()
  checkpointer.close()
  if jax.process_index() == 0:
    config_lib.dump(config, storage.join(path, CONFIG_FILE))
    tokenizer_path = storage.join(path, TOKENIZER_FILE)
    if tokenizer_spec is not None:
      storage.write_text(tokenizer_path, json.dumps(tokenizer_spec, indent=2))
    else:
      storage.remove(tokenizer_path)
  return path


def _absolute(path) -> str:
  """A bucket URI as it is, a local path made absolute."""
  path = os.fspath(path)
  return path if storage.is_remote(path) else os.path.abspath(os.path.expanduser(path))


def meta_record(step: int, config: Config, tokenizer_spec: dict | None, has_data: bool) -> dict:
  return {"format": FORMAT_VERSION, "step": int(step), "config": config.to_dict(),
          "tokenizer": tokenizer_spec, "has_data": has_data}


# --------------------------------------------------------------------------------------------
# Finding things


def committed_steps(checkpoint_dir: str) -> list[int]:
  """Steps Orbax finished committing, ascending. A save in flight or killed lives in a
  `<step>.orbax-checkpoint-tmp-*` directory until its atomic rename, so it is never listed."""
  if not storage.isdir(checkpoint_dir):
    return []
  return sorted(int(child.name) for child in storage.path(checkpoint_dir).iterdir()
                if child.name.isdigit() and child.is_dir())


def read_meta(step_dir: str) -> dict:
  handler = ocp.JsonCheckpointHandler()
  meta = handler.restore(epath.Path(step_dir) / META, args=ocp.args.JsonRestore())
  if not isinstance(meta, dict) or "config" not in meta:
    raise CheckpointError(f"{step_dir}/{META} does not hold a config record")
  return meta


def saved_state_tree(step_dir: str):
  """The metadata tree (shapes, dtypes) of a step's `state` item, without reading arrays."""
  return _tree_metadata(epath.Path(step_dir) / STATE)


def _tree_metadata(item_dir: epath.Path) -> dict:
  if not item_dir.is_dir():
    raise CheckpointError(f"{item_dir} is missing")
  metadata = ocp.PyTreeCheckpointer().metadata(item_dir)
  tree = getattr(metadata, "item_metadata", metadata)
  tree = getattr(tree, "tree", tree)
  if not isinstance(tree, dict) or not tree:
    # Orbax returns None rather than raising when its metadata files are unreadable.
    raise CheckpointError(f"the array metadata in {item_dir} is missing or unreadable")
  return tree


def kind_of(path: str) -> str:
  """Which layout `path` holds: "export", "step", "run" (WORKDIR/checkpoints/<step>) or
  "steps" (a checkpoints/ folder itself). Raises CheckpointError naming the layouts otherwise."""
  if not storage.exists(path):
    raise CheckpointError(f"checkpoint path {path} does not exist; give a run directory "
                          f"(train.workdir), one of its step directories or an export")
  if storage.isdir(storage.join(path, EXPORT_PARAMS)) and storage.exists(
      storage.join(path, CONFIG_FILE)):
    return "export"
  if storage.isdir(storage.join(path, STATE)) or storage.isdir(storage.join(path, META)):
    return "step"
  if storage.isdir(storage.join(path, CHECKPOINT_DIR)):
    return "run"
  if committed_steps(path):
    return "steps"
  raise CheckpointError(
      f"{path} is not a checkpoint: expected a run directory (with {CHECKPOINT_DIR}/<step>/), "
      f"a step directory (with {STATE}/ and {META}/) or an export directory (with "
      f"{EXPORT_PARAMS}/ and {CONFIG_FILE})")


@dataclasses.dataclass(frozen=True)
class Resolved:
  """Where a checkpoint path leads: its layout, the checkpoints/ folder (run and steps
  layouts) and the step that will be read (None for an export)."""

  kind: str
  path: str
  checkpoint_dir: str | None
  step: int | None

  @property
  def step_dir(self) -> str | None:
    if self.kind == "step":
      return self.path
    if self.step is None or self.checkpoint_dir is None:
      return None
    return storage.join(self.checkpoint_dir, str(self.step))


def probe_step(step_dir: str) -> dict:
  """Reads a step's meta record and its arrays' metadata (no array data): the checks that
  find a damaged or half-copied step before Orbax starts reading it. Returns the meta record."""
  meta = read_meta(step_dir)
  saved = saved_state_tree(step_dir)
  if "params" not in saved:
    raise CheckpointError(f"{step_dir}/{STATE} holds no params")
  return meta


def resolve(path: str, step: int | None = None, *, report: bool = True) -> Resolved:
  """The step a path leads to: `step` if given, the step directory's own, or the newest step
  whose files are readable (falling back past damaged ones with a notice when `report`).

  Raises CheckpointError with one line naming the problem and the fix: a missing path, a
  folder that is no checkpoint, a `step` that is not there (listing those that are), a given
  step that is damaged, or every step damaged.
  """
  storage.check(path, "checkpoint path")
  path = _absolute(path)
  kind = kind_of(path)
  if kind == "export":
    if step is not None:
      raise CheckpointError(f"{path} is an export (one set of params); it has no steps, so "
                            f"drop --step {step}")
    return Resolved(kind, path, None, None)
  if kind == "step":
    name = os.path.basename(path)
    if step is not None and str(step) != name:
      raise CheckpointError(f"{path} is the directory of one step; pass its run directory to "
                            f"choose step {step}")
    return Resolved(kind, path, os.path.dirname(path), int(name) if name.isdigit() else None)
  checkpoint_dir = storage.join(path, CHECKPOINT_DIR) if kind == "run" else path
  found, _, _ = newest_good(checkpoint_dir,
                            lambda s: probe_step(storage.join(checkpoint_dir, str(s))), step,
                            report=report)
  return Resolved(kind, path, checkpoint_dir, found)


def newest_good(checkpoint_dir: str, load: Callable[[int], Any], step: int | None = None,
                report: bool = True, at_most: int | None = None):
  """Runs `load(step)` on the newest committed step (or `step`); on a damaged step it says
  which step and what is wrong and falls back to the next older one.

  Returns (step, load(step), problems) where problems lists the skipped steps' messages. A
  CheckpointMismatchError is not damage (older steps hold the same model) and is raised.
  `at_most` leaves out newer steps (already found damaged by an earlier pass).
  """
  steps = committed_steps(checkpoint_dir)
  if step is not None:
    if step not in steps:
      raise CheckpointError(
          f"step {step} is not in {checkpoint_dir}; its complete steps are "
          f"{', '.join(map(str, steps)) if steps else 'none'}"
          + ("; choose one of them" if steps else ""))
    candidates = [step]
  else:
    candidates = [s for s in steps[::-1] if at_most is None or s <= at_most]
  if not candidates:
    raise CheckpointError(f"no complete checkpoint in {checkpoint_dir}; train first (a run "
                          f"saves every checkpoint.every steps and at its end)")
  problems = []
  for i, s in enumerate(candidates):
    try:
      return s, load(s), problems
    except CheckpointMismatchError:
      raise
    except Exception as e:  # noqa: BLE001 - any failure to read a step means it is unusable
      quiet.abandoned_reads()
      problem = (f"checkpoint step {s} in {checkpoint_dir} is damaged or incomplete "
                 f"({brief(e)})")
      problems.append(problem)
      if step is not None:
        others = [o for o in steps if o != s]
        raise CheckpointError(
            problem + (f"; choose another step ({', '.join(map(str, others))})" if others
                       else "; this run has no other step")) from e
      older = candidates[i + 1] if i + 1 < len(candidates) else None
      if report:
        say(problem + (f"; falling back to step {older}" if older is not None else ""))
  raise CheckpointError(
      f"every checkpoint in {checkpoint_dir} is damaged or incomplete (newest: "
      f"{problems[0].split(' (', 1)[-1].rstrip(')')}); restore the run directory from a copy, "
      f"or move {checkpoint_dir} aside to train from scratch")


# --------------------------------------------------------------------------------------------
# Reading params


def _restore_params(item_dir: epath.Path, target: dict, *, nested_under: str | None) -> dict:
  """Restores `target` (abstract params with shardings) from an Orbax PyTree directory,
  optionally from the subtree `nested_under` of a larger tree (partial restore)."""
  restore_args = jax.tree.map(
      lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding, global_shape=s.shape, dtype=s.dtype),
      target)
  if nested_under:
    target, restore_args = {nested_under: target}, {nested_under: restore_args}
  restored = ocp.PyTreeCheckpointer().restore(
      item_dir, args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args,
                                            partial_restore=bool(nested_under)))
  return restored[nested_under] if nested_under else restored


@dataclasses.dataclass(frozen=True)
class Loaded:
  """What load_checkpoint read: the step (None for an export), config, params, tokenizer."""

  step: int | None
  config: Config
  params: dict
  tokenizer_spec: dict | None


def _read_export_config(path: str) -> tuple[Config, dict | None]:
  cfg = config_lib.load_dict(yaml.safe_load(storage.read_text(storage.join(path, CONFIG_FILE))))
  tokenizer_path = storage.join(path, TOKENIZER_FILE)
  spec = json.loads(storage.read_text(tokenizer_path)) if storage.exists(tokenizer_path) else None
  return cfg, spec


def load_checkpoint(path: str, *, step: int | None = None, mesh=None,
                    model: ModelConfig | None = None, rules="fsdp",
                    report: bool = True) -> Loaded:
  """Params (and the config and tokenizer they were saved with) from a run, step or export
  directory, and the step they came from.

  A run directory gives its newest good step (or `step`), falling back past damaged steps with
  a notice. With `mesh`, params are restored sharded by their logical axes and `rules` (a name
  in sharding.RULES or a sharding.Rules); without, onto one device.
  `model`, if given, is the model the caller will run: a checkpoint of a different shape is a
  CheckpointMismatchError naming the first mismatched parameter and both shapes.
  """
  found = resolve(path, step, report=report)
  path = found.path

  def check(saved_params, cfg: Config) -> ModelConfig:
    want = model or cfg.model
    fix = ("use the model config the checkpoint was trained with (its config.yaml / meta)"
           if model is not None else "the checkpoint's config does not match its arrays")
    check_same_shapes(abstract_params(want), saved_params, prefix="params.",
                      where=f"checkpoint {path}", fix=fix)
    return want

  if found.kind == "export":
    cfg, tokenizer_spec = _read_export_config(path)
    item = storage.path(path) / EXPORT_PARAMS
    want = check(_tree_metadata(item), cfg)
    params = _restore_params(item, restore_target(want, mesh, rules), nested_under=None)
    return Loaded(None, cfg, params, tokenizer_spec)

  def load_step(step_dir: str):
    meta = probe_step(step_dir)
    cfg = config_lib.load_dict(meta["config"])
    want = check(saved_state_tree(step_dir)["params"], cfg)
    params = _restore_params(epath.Path(step_dir) / STATE, restore_target(want, mesh, rules),
                             nested_under="params")
    return cfg, params, meta.get("tokenizer")

  if found.kind == "step":
    return Loaded(found.step, *load_step(path))
  # The files of the resolved step were readable; its array data may still be damaged, in
  # which case older steps are tried (unless a step was asked for).
  got, loaded, _ = newest_good(
      found.checkpoint_dir, lambda s: load_step(storage.join(found.checkpoint_dir, str(s))),
      step, report=report, at_most=found.step)
  return Loaded(got, *loaded)


def load_params(path: str, *, step: int | None = None, mesh=None, model: ModelConfig | None = None,
                rules="fsdp") -> tuple[Config, dict, dict | None]:
  """(config, params, tokenizer_spec) of load_checkpoint."""
  loaded = load_checkpoint(path, step=step, mesh=mesh, model=model, rules=rules)
  return loaded.config, loaded.params, loaded.tokenizer_spec


def read_config(path: str, *, step: int | None = None,
                report: bool = True) -> tuple[Config, dict | None]:
  """(config, tokenizer_spec) of the checkpoint load_checkpoint would read, without reading
  any arrays."""
  found = resolve(path, step, report=report)
  if found.kind == "export":
    return _read_export_config(found.path)
  meta = read_meta(found.step_dir)
  return config_lib.load_dict(meta["config"]), meta.get("tokenizer")
