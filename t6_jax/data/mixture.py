"""data.mixture: several sources read as one stream, each at its share of the rows.

  data.mixture="0.7:arrayrecord:data/web;0.2:text:corpus/code/*.py;0.1:reference_bin:/data/fw"

Items are `WEIGHT:SOURCE:PATH`, separated by `;` (a PATH may hold commas, as data.path does,
and colons, as gs:// does). SOURCE is any data.source; PATH is what data.path (or, for tfds,
data.tfds_name) would be; the shakespeare source takes none. Every other data.* setting
(tokenizer, packing, splits, cache_dir, ...) is shared. Weights are relative (they need not sum
to 1): of every 10 rows, 7, 2 and 1 come from the sources above.
"""

from __future__ import annotations

import dataclasses

from t6_jax.config import ConfigError

SOURCES = ("shakespeare", "text", "arrayrecord", "reference_bin", "tfds")


def parse(spec: str) -> list[tuple[float, str, str]]:
  """[(weight, source, path)] of a data.mixture string; ConfigError naming a bad item."""
  out = []
  for item in (s.strip() for s in spec.split(";")):
    if not item:
      continue
    parts = item.split(":", 2)
    if len(parts) < 2:
      raise ConfigError(f"data.mixture item {item!r} is not WEIGHT:SOURCE:PATH (e.g. "
                        f"0.7:arrayrecord:data/web)")
    weight_text, source, path = parts[0].strip(), parts[1].strip(), (parts[2:] or [""])[0]
    try:
      weight = float(weight_text)
    except ValueError:
      raise ConfigError(f"data.mixture item {item!r}: weight {weight_text!r} is not a number") \
          from None
    if not weight > 0:
      raise ConfigError(f"data.mixture item {item!r}: the weight must be positive")
    if source not in SOURCES:
      raise ConfigError(f"data.mixture item {item!r}: source {source!r} is not one of "
                        f"{', '.join(SOURCES)}")
    if source != "shakespeare" and not path.strip():
      raise ConfigError(f"data.mixture item {item!r}: {source} needs a "
                        f"{'dataset name' if source == 'tfds' else 'path'} after the source")
    out.append((weight, source, path.strip()))
  if len(out) < 2:
    raise ConfigError(f"data.mixture={spec!r} names {len(out)} source(s); a mixture takes two "
                      f"or more (for one, set data.source and data.path)")
  keys = [f"{s}:{p}" for _, s, p in out]
  if len(set(keys)) != len(keys):
    raise ConfigError(f"data.mixture={spec!r} names a source twice; give each once, with "
                      f"the sum of its weights")
  return out


def components(data_cfg) -> list[tuple[str, float, object]]:
  """[(name, weight, the DataConfig that reads that source alone)] of data.mixture; the name
  keys the source's position in the iterator's checkpointed state."""
  out = []
  for weight, source, path in parse(data_cfg.mixture):
    fields = dict(source=source, mixture="")
    if source == "tfds":
      fields["tfds_name"] = path
    else:
      fields["path"] = path
    out.append((f"{source}:{path}", weight, dataclasses.replace(data_cfg, **fields)))
  return out


def source_configs(cfg) -> list[tuple[str, object]]:
  """[(name, the whole Config with that source alone as its data)] of cfg.data.mixture: what
  each source's own validation (training's val_loss/NAME, eval.py's rows) reads."""
  return [(name, dataclasses.replace(cfg, data=data_cfg))
          for name, _, data_cfg in components(cfg.data)]
