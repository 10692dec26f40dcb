"""Reading and writing the reference's checkpoint files as numpy arrays.

- Hugging Face directories (`config.json` + `model.safetensors`, `pytorch_model.bin`, or their
  sharded `*.index.json` forms) and bare files (`.safetensors`, `.bin`, `.pt`, `.pth`).
- `.bin` / `.pt` are torch's zip format (data.pkl + one raw file per storage). With torch
  installed they are read by `torch.load(weights_only=True)`; without it, by a restricted
  unpickler that only rebuilds tensors from those raw storages (it refuses every other global,
  so a malicious pickle cannot run code).
- safetensors are read and written by the `safetensors` package on raw bytes (its numpy
  helpers do not know bf16), so bf16 tensors load without torch.
"""

from __future__ import annotations

import collections
import json
import os
import pickle
import tempfile
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

from t6_jax import storage
from t6_jax.convert.layout import ConvertError

SAFETENSORS = "model.safetensors"
TORCH_BIN = "pytorch_model.bin"
CONFIG_JSON = "config.json"

_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
              "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
              "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_TORCH_STORAGES = {"DoubleStorage": np.float64, "FloatStorage": np.float32,
                   "HalfStorage": np.float16, "BFloat16Storage": ml_dtypes.bfloat16,
                   "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
                   "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_}


def have_torch() -> bool:
  try:
    import torch  # noqa: F401
    return True
  except ImportError:
    return False


# --------------------------------------------------------------------------------------------
# safetensors


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  import safetensors
  with open(path, "rb") as f:
    blob = f.read()
  try:
    tensors = safetensors.deserialize(blob)
  except safetensors.SafetensorError as e:
    raise ConvertError(f"{path} is not a readable safetensors file ({e}); is it complete?") from e
  del blob
  out = {}
  for key, info in tensors:
    if info["dtype"] not in _ST_DTYPES:
      raise ConvertError(f"{path}: tensor {key} has dtype {info['dtype']}, not supported")
    out[key] = np.frombuffer(info["data"], _ST_DTYPES[info["dtype"]]).reshape(info["shape"])
  return out


def write_safetensors(path: str, sd: dict[str, np.ndarray]) -> None:
  from safetensors.numpy import save_file
  save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, path,
            metadata={"format": "pt"})  # "pt": what transformers' from_pretrained expects


# --------------------------------------------------------------------------------------------
# torch zip pickles


class _Storage:
  def __init__(self, dtype):
    self.dtype = dtype


def _rebuild_tensor(storage, offset, size, stride, *unused):
  del unused
  if not size:
    return storage[offset].copy()
  itemsize = storage.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                         strides=tuple(s * itemsize for s in stride))
  return np.array(view)


def _rebuild_parameter(data, *unused):
  del unused
  return data


class _RestrictedUnpickler(pickle.Unpickler):
  """Rebuilds a state dict of tensors from torch's zip format, allowing nothing else."""

  def __init__(self, file, archive: zipfile.ZipFile, prefix: str, path: str):
    super().__init__(file)
    self.archive, self.prefix, self.path = archive, prefix, path
    self.storages: dict[str, np.ndarray] = {}

  def find_class(self, module, name):
    if (module, name) == ("collections", "OrderedDict"):
      return collections.OrderedDict
    if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
      return _rebuild_tensor
    if (module, name) == ("torch._utils", "_rebuild_parameter"):
      return _rebuild_parameter
    if module == "torch" and name in _TORCH_STORAGES:
      return _Storage(np.dtype(_TORCH_STORAGES[name]))
    raise ConvertError(f"{self.path} holds {module}.{name}, which the torch-free reader does not "
                       f"load (it only reads plain state dicts of tensors); install torch "
                       f"(pip install 't6-jax[torch]') to read this file")

  def persistent_load(self, pid):
    kind, storage, key, _location, numel = pid
    if kind != "storage" or not isinstance(storage, _Storage):
      raise ConvertError(f"{self.path}: unsupported storage record {pid!r}")
    if key not in self.storages:
      raw = self.archive.read(f"{self.prefix}data/{key}")
      self.storages[key] = np.frombuffer(raw, dtype=storage.dtype, count=numel)
    return self.storages[key]


def read_torch_zip_without_torch(path: str) -> Any:
  with zipfile.ZipFile(path) as archive:
    pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
    if len(pickles) != 1:
      raise ConvertError(f"{path} is not a torch zip checkpoint (no single data.pkl inside)")
    prefix = pickles[0][:-len("data.pkl")]
    byteorder = prefix + "byteorder"
    if byteorder in archive.namelist() and archive.read(byteorder).strip() != b"little":
      raise ConvertError(f"{path} was saved big-endian; install torch to read it")
    with archive.open(pickles[0]) as f:
      return _RestrictedUnpickler(f, archive, prefix, path).load()


def read_torch(path: str) -> Any:
  """A torch.save'd object with tensors as numpy arrays."""
  if have_torch():
    import torch
    obj = torch.load(path, map_location="cpu", weights_only=True)
    return _tensors_to_numpy(obj)
  if not zipfile.is_zipfile(path):
    raise ConvertError(f"{path} is a legacy (pre-zip) torch file; install torch to read it "
                       f"(pip install 't6-jax[torch]')")
  return read_torch_zip_without_torch(path)


def _tensors_to_numpy(obj):
  import torch
  if isinstance(obj, torch.Tensor):
    t = obj.detach().cpu()
    if t.dtype == torch.bfloat16:
      return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
    return t.numpy().copy()
  if isinstance(obj, dict):
    return {k: _tensors_to_numpy(v) for k, v in obj.items()}
  return obj


def write_torch_bin(path: str, sd: dict[str, np.ndarray], tied_head: bool = True) -> None:
  """pytorch_model.bin as `save_pretrained(safe_serialization=False)` writes it: both tied keys
  sharing one storage."""
  import torch
  tensors = collections.OrderedDict((k, torch.from_numpy(np.ascontiguousarray(v)))
                                    for k, v in sd.items())
  if tied_head and "transformer.wte.weight" in tensors:
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"]
  torch.save(tensors, path)


# --------------------------------------------------------------------------------------------
# Whole checkpoints


def _state_dict_of(obj: Any, path: str) -> dict[str, np.ndarray]:
  """The state dict inside a loaded object: itself, or a training checkpoint's 'model' entry."""
  if isinstance(obj, dict) and obj and all(isinstance(v, np.ndarray) for v in obj.values()):
    return dict(obj)
  if isinstance(obj, dict):
    for key in ("model", "state_dict", "model_state_dict"):
      if isinstance(obj.get(key), dict):
        return _state_dict_of(obj[key], path)
  raise ConvertError(f"{path} does not hold a state dict of tensors (nor one under 'model' or "
                     f"'state_dict'); save it with torch.save(model.state_dict(), PATH)")


def _read_weights_file(path: str) -> dict[str, np.ndarray]:
  if path.endswith(".safetensors"):
    return read_safetensors(path)
  if path.endswith(".index.json"):
    with open(path) as f:
      weight_map = json.load(f)["weight_map"]
    sd = {}
    for shard in sorted(set(weight_map.values())):
      sd.update(_read_weights_file(os.path.join(os.path.dirname(path), shard)))
    return sd
  return _state_dict_of(read_torch(path), path)


def _read_remote_checkpoint(src: str, config_json: str | None
                            ) -> tuple[dict[str, np.ndarray], dict | None, str]:
  """read_checkpoint of a bucket path: its weight and JSON files are copied to a temporary
  folder first (the readers need local files), then read as a local checkpoint."""
  storage.check(src, "checkpoint")
  if not storage.exists(src):
    raise ConvertError(f"reference checkpoint {src} does not exist; give the folder that holds "
                       f"its {SAFETENSORS} or {TORCH_BIN} (and config.json), or that file")
  folder = src.rstrip("/") if storage.isdir(src) else src.rstrip("/").rpartition("/")[0]
  with tempfile.TemporaryDirectory(prefix="t6_convert_") as tmp:
    for name in storage.listdir(folder):
      if name.endswith((".safetensors", ".bin", ".json", ".pt", ".pth")) or (
          not storage.isdir(src) and name == src.rstrip("/").rpartition("/")[2]):
        storage.copy(storage.join(folder, name), os.path.join(tmp, name))
    local_src = tmp if storage.isdir(src) else os.path.join(tmp, src.rpartition("/")[2])
    local_config = None
    if config_json is not None:
      local_config = os.path.join(tmp, "given_" + CONFIG_JSON)
      storage.copy(config_json, local_config)
    sd, hf, weights = read_checkpoint(local_src, local_config)
    return sd, hf, storage.join(folder, os.path.basename(weights))


def read_checkpoint(src: str, config_json: str | None = None
                    ) -> tuple[dict[str, np.ndarray], dict | None, str]:
  """(state dict, config.json dict or None, weights file) of a reference checkpoint, local or
  in a bucket (gs://...)."""
  if storage.is_remote(src) or (config_json is not None and storage.is_remote(config_json)):
    if storage.is_remote(src):
      return _read_remote_checkpoint(src, config_json)
    storage.check(config_json, "--config_json")
    hf = json.loads(storage.read_text(config_json))
    sd, _, weights = read_checkpoint(src)
    return sd, hf, weights
  if not os.path.exists(src):
    raise ConvertError(f"reference checkpoint {src} does not exist; give the folder that holds "
                       f"its {SAFETENSORS} or {TORCH_BIN} (and config.json), or that file")
  hf = None
  if os.path.isdir(src):
    candidates = [SAFETENSORS, SAFETENSORS + ".index.json", TORCH_BIN, TORCH_BIN + ".index.json"]
    found = [c for c in candidates if os.path.exists(os.path.join(src, c))]
    if not found:
      raise ConvertError(f"{src} holds none of {', '.join(candidates)} (it has "
                         f"{', '.join(sorted(os.listdir(src))[:8]) or 'nothing'})")
    weights = os.path.join(src, found[0])
    if config_json is None and os.path.exists(os.path.join(src, CONFIG_JSON)):
      config_json = os.path.join(src, CONFIG_JSON)
  else:
    weights = src
  if config_json is not None:
    with open(config_json) as f:
      hf = json.load(f)
  return _read_weights_file(weights), hf, weights


def write_checkpoint(out_dir: str, sd: dict[str, np.ndarray], hf_config: dict,
                     fmt: str = "auto") -> str:
  """config.json + pytorch_model.bin (fmt bin, or auto with torch) or model.safetensors, into a
  local folder or a bucket (written locally, then uploaded)."""
  if fmt == "auto":
    fmt = "bin" if have_torch() else "safetensors"
  if storage.is_remote(out_dir):
    storage.check(out_dir, "--out")
    with tempfile.TemporaryDirectory(prefix="t6_convert_") as tmp:
      path = write_checkpoint(tmp, sd, hf_config, fmt)
      for name in os.listdir(tmp):
        storage.copy(os.path.join(tmp, name), storage.join(out_dir, name))
      return storage.join(out_dir, os.path.basename(path))
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, CONFIG_JSON), "w") as f:
    json.dump(hf_config, f, indent=2)
  if fmt == "bin":
    if not have_torch():
      raise ConvertError("writing pytorch_model.bin needs torch (pip install 't6-jax[torch]'); "
                         "use --format safetensors")
    path = os.path.join(out_dir, TORCH_BIN)
    write_torch_bin(path, sd)
  elif fmt == "safetensors":
    path = os.path.join(out_dir, SAFETENSORS)
    write_safetensors(path, sd)
  else:
    raise ConvertError(f"unknown format {fmt!r}; use auto, bin or safetensors")
  return path
