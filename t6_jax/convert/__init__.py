"""The PyTorch reference's checkpoints in and out, and the logit checker.

  python -m t6_jax.convert from-torch SRC OUT_DIR        reference checkpoint -> params export
  python -m t6_jax.convert to-torch RUN_DIR OUT_DIR      our checkpoint -> reference layout
  python -m t6_jax.convert verify CKPT --tokens T.npy --logits L.npy   golden-logit check

See docs/interop.md.
"""

from t6_jax.convert.layout import (ConvertError, model_config, params_from_torch,  # noqa: F401
                                   params_to_torch, ref_shapes, torch_config)
from t6_jax.convert.main import from_torch, to_torch, verify  # noqa: F401
