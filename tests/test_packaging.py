"""What an installed t6-jax carries: every package of the source tree, and the presets."""

import os
import tomllib

from t6_jax import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_package_list_names_every_package_and_the_presets():
  """pyproject lists the packages by hand (the presets map configs/ into the package, which
  setuptools' package finder cannot express): the list must be the source tree's packages."""
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    tool = tomllib.load(f)["tool"]["setuptools"]
  tree = {os.path.relpath(d, ROOT).replace(os.sep, ".")
          for d, _, files in os.walk(os.path.join(ROOT, "t6_jax")) if "__init__.py" in files}
  assert set(tool["packages"]) == tree | {"t6_jax.presets"}
  assert tool["package-dir"] == {"t6_jax.presets": "configs"}
  assert tool["package-data"]["t6_jax.presets"] == ["*.yaml"]


def test_presets_resolve_from_a_checkout_or_an_install(tmp_path, monkeypatch):
  """A checkout reads configs/; an install (t6_jax/presets beside config.py) reads its own."""
  assert os.path.samefile(config_lib.CONFIG_DIR, os.path.join(ROOT, "configs"))
  package = tmp_path / "site-packages" / "t6_jax"
  (package / "presets").mkdir(parents=True)
  monkeypatch.setattr(config_lib, "__file__", str(package / "config.py"))
  assert config_lib._preset_dir() == str(package / "presets")
