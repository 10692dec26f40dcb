"""The T6 model and its attention baselines."""

from t6_jax.model.transformer import Block, Transformer  # noqa: F401
