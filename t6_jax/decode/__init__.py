"""Cached decoding: the factor cache, prefill, the jitted token loop, sampling."""

from t6_jax.decode.cache import (Cache, cache_bytes, cache_bytes_per_token,  # noqa: F401
                                 entry_axes, entry_shapes, init_cache)
from t6_jax.decode.generate import (decode, generate, prefill, sample_logits,  # noqa: F401
                                    sample_text, shard_params)
