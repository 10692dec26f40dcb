"""Cached decoding: the factor cache, prefill, the jitted token loop, sampling."""

from t6_jax.decode.cache import (Cache, cache_bytes, entry_axes, entry_shapes,  # noqa: F401
                                 init_cache)
from t6_jax.decode.generate import (decode, decode_loop, generate, prefill,  # noqa: F401
                                    prepare_decode, sample_logits, sample_text)
from t6_jax.decode.weights import DecodeWeights  # noqa: F401
from t6_jax.model.placement import shard_params  # noqa: F401
from t6_jax.model.sizes import cache_bytes_per_token  # noqa: F401
