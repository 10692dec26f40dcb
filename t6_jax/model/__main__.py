"""python -m t6_jax.model --config configs/t6-small.yaml [key=value ...]

Prints the parameter count of a preset without allocating it, and its decode-cache size.
"""

import argparse
import sys

from t6_jax import config as config_lib
from t6_jax.model.sizes import (cache_bytes_per_token, cache_numbers_per_token_per_layer,
                                param_count)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m t6_jax.model", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="t6-small", help="YAML file or preset name")
  parser.add_argument("--cache_dtype", default="bfloat16", help="dtype for the cache bytes")
  parser.add_argument("overrides", nargs="*", help="model.key=value overrides")
  args = parser.parse_args(argv)
  try:
    cfg = config_lib.load(args.config, args.overrides).model
  except config_lib.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  per_layer = cache_numbers_per_token_per_layer(cfg)
  print(f"attention: {cfg.attention}  layers: {cfg.num_layers}  d_model: {cfg.d_model}  "
        f"heads: {cfg.num_heads}")
  print(f"params: {param_count(cfg)}")
  print(f"kv cache per token: {per_layer} numbers per layer, {per_layer * cfg.num_layers} in all, "
        f"{cache_bytes_per_token(cfg, args.cache_dtype)} bytes in {args.cache_dtype}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
