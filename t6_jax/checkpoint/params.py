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

import json
import os
import sys
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

import yaml

from t6_jax import config as config_lib
from t6_jax import storage
from t6_jax.checkpoint.trees import (CheckpointError, CheckpointMismatchError, abstract_params,
                                     check_same_shapes, restore_target)
from t6_jax.config import Config, ModelConfig

CHECKPOINT_DIR = "checkpoints"  # under a run's workdir
STATE, DATA, META = "state", "data", "meta"  # items of a train step
EXPORT_PARAMS, CONFIG_FILE, TOKENIZER_FILE = "params", "config.yaml", "tokenizer.json"
FORMAT_VERSION = 1


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
    storage.write_text(storage.join(path, CONFIG_FILE),
                       yaml.safe_dump(config.to_dict(), sort_keys=False))
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


def _read_export_config(path: str) -> tuple[Config, dict | None]:
  cfg = config_lib.load_dict(yaml.safe_load(storage.read_text(storage.join(path, CONFIG_FILE))))
  tokenizer_path = storage.join(path, TOKENIZER_FILE)
  spec = json.loads(storage.read_text(tokenizer_path)) if storage.exists(tokenizer_path) else None
  return cfg, spec


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


def _kind(path: str) -> str:
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


def newest_good(checkpoint_dir: str, load: Callable[[int], Any], step: int | None = None,
                report: bool = True):
  """Runs `load(step)` on the newest committed step (or `step`); on a damaged step it says
  which step and what is wrong and falls back to the next older one.

  Returns (step, load(step), problems) where problems lists the skipped steps' messages. A
  CheckpointMismatchError is not damage (older steps hold the same model) and is raised.
  """
  steps = committed_steps(checkpoint_dir)
  if step is not None:
    if step not in steps:
      raise CheckpointError(
          f"no complete checkpoint for step {step} in {checkpoint_dir}; complete steps: "
          f"{steps or 'none'}")
    candidates = [step]
  else:
    candidates = steps[::-1]
  if not candidates:
    raise CheckpointError(f"no complete checkpoint in {checkpoint_dir}")
  problems = []
  for i, s in enumerate(candidates):
    try:
      return s, load(s), problems
    except CheckpointMismatchError:
      raise
    except Exception as e:  # noqa: BLE001 - any failure to read a step means it is unusable
      problem = (f"checkpoint step {s} in {checkpoint_dir} is damaged or incomplete "
                 f"({brief(e)})")
      problems.append(problem)
      if step is not None:
        raise CheckpointError(problem + "; restore another step or delete this one") from e
      older = candidates[i + 1] if i + 1 < len(candidates) else None
      if report:
        say(problem + (f"; falling back to step {older}" if older is not None else ""))
  raise CheckpointError(
      f"every checkpoint in {checkpoint_dir} is damaged or incomplete: "
      + "; ".join(problems) + f". Delete {checkpoint_dir} to start afresh.")


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


def load_params(path: str, *, step: int | None = None, mesh=None, model: ModelConfig | None = None,
                rules: str | dict | None = None) -> tuple[Config, dict, dict | None]:
  """(config, params, tokenizer_spec) from a run, step or export directory.

  A run directory gives its newest good step (or `step`), falling back past damaged steps with
  a message. With `mesh`, params are restored sharded by their logical axes and `rules` (a name
  in sharding.RULES or a table; default the active table); without, onto one device.
  `model`, if given, is the model the caller will run: a checkpoint of a different shape is a
  CheckpointMismatchError naming the first mismatched parameter and both shapes.
  """
  storage.check(path, "checkpoint path")
  path = _absolute(path)
  if not storage.exists(path):
    raise CheckpointError(f"checkpoint path {path} does not exist")
  kind = _kind(path)

  def check(saved_params, cfg: Config) -> ModelConfig:
    want = model or cfg.model
    where = f"checkpoint {path}"
    fix = ("use the model config the checkpoint was trained with (its config.yaml / meta)"
           if model is not None else "the checkpoint's config does not match its arrays")
    check_same_shapes(abstract_params(want), saved_params, prefix="params.", where=where,
                      fix=fix)
    return want

  if kind == "export":
    if step is not None:
      raise CheckpointError(f"{path} is an export (one set of params); it has no steps")
    cfg, tokenizer_spec = _read_export_config(path)
    item = storage.path(path) / EXPORT_PARAMS
    want = check(_tree_metadata(item), cfg)
    params = _restore_params(item, restore_target(want, mesh, rules), nested_under=None)
    return cfg, params, tokenizer_spec

  def load_step(step_dir: str):
    meta = read_meta(step_dir)
    cfg = config_lib.load_dict(meta["config"])
    saved = saved_state_tree(step_dir)
    if not isinstance(saved, dict) or "params" not in saved:
      raise CheckpointError(f"{step_dir}/{STATE} holds no params")
    want = check(saved["params"], cfg)
    params = _restore_params(epath.Path(step_dir) / STATE, restore_target(want, mesh, rules),
                             nested_under="params")
    return cfg, params, meta.get("tokenizer")

  if kind == "step":
    if step is not None:
      raise CheckpointError(f"{path} is one step's directory; pass the run directory to choose "
                            f"step={step}")
    return load_step(path)
  checkpoint_dir = storage.join(path, CHECKPOINT_DIR) if kind == "run" else path
  _, loaded, _ = newest_good(checkpoint_dir,
                             lambda s: load_step(storage.join(checkpoint_dir, str(s))), step)
  return loaded


def read_config(path: str, *, step: int | None = None) -> tuple[Config, dict | None]:
  """(config, tokenizer_spec) of a checkpoint without reading any arrays."""
  storage.check(path, "checkpoint path")
  path = _absolute(path)
  kind = _kind(path)
  if kind == "export":
    return _read_export_config(path)
  if kind == "step":
    meta = read_meta(path)
    return config_lib.load_dict(meta["config"]), meta.get("tokenizer")
  checkpoint_dir = storage.join(path, CHECKPOINT_DIR) if kind == "run" else path
  _, meta, _ = newest_good(checkpoint_dir,
                           lambda s: read_meta(storage.join(checkpoint_dir, str(s))), step)
  return config_lib.load_dict(meta["config"]), meta.get("tokenizer")
