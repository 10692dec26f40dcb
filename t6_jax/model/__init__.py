"""The T6 model and its attention baselines."""

from t6_jax.model.transformer import (Block, Transformer, inference_params,  # noqa: F401
                                      init_params, model_from_params, param_axes)
from t6_jax.model.placement import param_shardings, shard_params  # noqa: F401
