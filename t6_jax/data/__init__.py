"""The input pipeline: sources, tokenizers, Grain datasets (see docs/data.md)."""

from t6_jax.data.pipeline import (ConcatWindows, document_batches, load_tokenizer,  # noqa: F401
                                  make_dataset, window_batches)
from t6_jax.data.sources import DataError  # noqa: F401
from t6_jax.data.tokenizers import Tokenizer, TokenizerError, tokenizer_from_spec  # noqa: F401
