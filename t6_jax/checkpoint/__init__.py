"""Orbax checkpoints: the training Checkpointer and params-only export / load.

  from t6_jax.checkpoint import Checkpointer, export_params, load_params

See docs/checkpoints.md for the layout, resume, preemption and re-meshing.
"""

from t6_jax.checkpoint.manager import Checkpointer  # noqa: F401
from t6_jax.checkpoint.params import (Loaded, Resolved, export_params, kind_of,  # noqa: F401
                                      load_checkpoint, load_params, read_config, resolve)
from t6_jax.checkpoint.trees import CheckpointError, CheckpointMismatchError  # noqa: F401
