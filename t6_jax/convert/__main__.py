"""python -m t6_jax.convert from-torch|to-torch|verify ... (see --help)."""

import sys

from t6_jax.convert.main import main

if __name__ == "__main__":
  sys.exit(main())
