"""Read weights from files others wrote, safely: safetensors first, `torch.load(weights_only=True)`
for `.bin` / `.pth`, and for training-run checkpoints that also pickle other objects (mmengine's
`iter_N.pth`: `meta`, `message_hub`, optimizer state) a restricted unpickler that executes nothing:
only tensor rebuilds are real, every other class becomes an inert placeholder, and a pickle that
calls a function able to run code is refused. DeepSpeed `iter_N.pth/` folders are read through
their `mp_rank_00_model_states.pt`."""

from __future__ import annotations

import _compat_pickle
import json
import pickle
import types
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from vlmtune.models.family import ConversionError

__all__ = ["ConversionError", "read_state_dict", "load_pickle", "deepspeed_states"]

WEIGHT_NAMES = ("model.safetensors", "adapter_model.safetensors", "pytorch_model.bin", "adapter_model.bin")
DEEPSPEED_MODEL_STATES = "mp_rank_00_model_states.pt"


class PickleRefused(pickle.UnpicklingError):
    """A pickle that asks for a function able to run code."""


class Placeholder:
    """An object of a class that is not imported: what the pickle said about it, kept as data."""

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.state, obj.items = args, None, {}
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):
        self.items[key] = value

    def append(self, value):
        self.items[len(self.items)] = value

    def extend(self, values):
        for value in values:
            self.append(value)

    def __repr__(self):
        return f"<{type(self).__name__} (not imported)>"


_TORCH_REBUILDS = {
    ("torch._utils", "_rebuild_tensor"), ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor_v3"),
    ("torch._utils", "_rebuild_parameter"), ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch._utils", "_rebuild_device_tensor_from_numpy"), ("torch", "Size"), ("torch", "device"),
    ("torch.nn.parameter", "Parameter"), ("torch.serialization", "_get_layout"),
}
_SAFE_BUILTINS = {"set", "frozenset", "dict", "list", "tuple", "int", "float", "complex", "bool", "str", "bytes",
                  "bytearray", "slice", "range"}
# modules whose functions can run programs, touch files or import code: asking for them is refused
_DANGEROUS = {"os", "posix", "nt", "subprocess", "sys", "builtins", "__builtin__", "importlib", "runpy", "shutil",
              "socket", "pty", "platform", "code", "codeop", "ctypes", "pickle", "_pickle", "marshal", "types",
              "functools", "operator", "webbrowser", "multiprocessing", "asyncio", "threading", "signal", "io",
              "pathlib", "tempfile", "commands", "popen2", "timeit", "pdb", "bdb", "inspect", "cProfile", "profile"}
_placeholders: dict[tuple[str, str], type] = {}


def _placeholder(module: str, name: str) -> type:
    key = (module, name)
    if key not in _placeholders:
        _placeholders[key] = type(f"{module}.{name}", (Placeholder,), {"__module__": "vlmtune.models.weights"})
    return _placeholders[key]


class RestrictedUnpickler(pickle.Unpickler):
    """Tensors are rebuilt by torch; everything else is data or an inert placeholder; nothing runs."""

    def find_class(self, module: str, name: str):
        # protocol-2 pickles (torch.save's) may carry Python 2 names, as pickle's own find_class maps them
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in _TORCH_REBUILDS or (module == "collections" and name == "OrderedDict"):
            return getattr(__import__(module, fromlist=[name]), name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module == "_codecs" and name == "encode":  # protocol-2 pickles of bytes
            import _codecs

            return _codecs.encode
        if module in ("builtins", "__builtin__") and name in _SAFE_BUILTINS:
            return getattr(__import__("builtins"), name)
        if module.split(".")[0] in _DANGEROUS or module.startswith("torch") and not name[:1].isupper():
            raise PickleRefused(f"{module}.{name}")
        return _placeholder(module, name)


# `torch.load(pickle_module=...)` subclasses this module's `Unpickler` for the persistent storages
restricted_pickle = types.ModuleType("vlmtune_restricted_pickle")
restricted_pickle.Unpickler = RestrictedUnpickler
restricted_pickle.load = lambda file, **kw: RestrictedUnpickler(file, **kw).load()
restricted_pickle.__name__ = "pickle"


def load_pickle(path: Path, map_location="cpu"):
    """`torch.load` weights-only; a training checkpoint with other objects through the restricted unpickler."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        pass
    except Exception as err:
        raise ConversionError(f"{path}: not a PyTorch weight file ({type(err).__name__}: {err})") from None
    try:
        return torch.load(path, map_location=map_location, weights_only=False, pickle_module=restricted_pickle)
    except PickleRefused as err:
        raise ConversionError(f"{path}: refused: the pickle asks to call {err}, which could run code on this machine; "
                              "vlmtune reads only tensors and plain data from pickles. Load it only if you trust its "
                              "author, and save its state dict as .safetensors") from None
    except Exception as err:
        raise ConversionError(f"{path}: cannot be read as a PyTorch checkpoint ({type(err).__name__}: {err})") from None


def _tensors_of(loaded, path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside what a `.bin` / `.pth` held: itself, an mmengine checkpoint's `state_dict`,
    or a DeepSpeed model-states file's `module`."""
    if isinstance(loaded, dict):
        for key in ("state_dict", "module"):
            if isinstance(loaded.get(key), dict):
                loaded = loaded[key]
                break
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ConversionError(f"{path}: not a state dict (a mapping of names to tensors)")
    return dict(loaded)


def deepspeed_states(folder: Path) -> Path | None:
    """The model-states file of a DeepSpeed checkpoint folder (XTuner's `iter_N.pth/`), if it is one."""
    found = folder / DEEPSPEED_MODEL_STATES
    if found.is_file():
        return found
    tagged = sorted(folder.glob(f"*/{DEEPSPEED_MODEL_STATES}"))  # DeepSpeed's own `global_stepN/` tag folders
    return tagged[-1] if len(tagged) == 1 else None


def read_state_dict(path: str | Path, map_location="cpu") -> dict[str, torch.Tensor]:
    """All tensors of a weight file, or of a folder's weights (single file, shards, or a DeepSpeed folder)."""
    path = Path(path)
    if path.is_dir():
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index = path / index_name
            if index.is_file():
                state = {}
                for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
                    state.update(read_state_dict(path / shard, map_location))
                return state
        for name in WEIGHT_NAMES:
            if (path / name).is_file():
                return read_state_dict(path / name, map_location)
        states = deepspeed_states(path)
        if states is not None:
            state = read_state_dict(states, map_location)
            if state and all(t.numel() == 0 for t in state.values()):
                raise ConversionError(
                    f"{states}: a ZeRO-3 checkpoint, whose weights are split across the optimizer shards; gather "
                    f"them first (DeepSpeed's zero_to_fp32.py {path.parent} out.bin --tag {path.name}) and give that file")
            return state
        found = sorted(p.name for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pth", ".pt"))
        if len(found) == 1:
            return read_state_dict(path / found[0], map_location)
        raise ConversionError(f"{path}: no weight file found (looked for {', '.join(WEIGHT_NAMES)}, "
                              f"a shard index or a DeepSpeed {DEEPSPEED_MODEL_STATES})")
    if not path.is_file():
        raise ConversionError(f"{path} does not exist")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return _tensors_of(load_pickle(path, map_location), path)


def tensor_shapes(file: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype) for every tensor of a weight file; pickles load weights-only."""
    if file.suffix == ".safetensors":
        with safe_open(file, "pt") as fh:
            return {k: (tuple(fh.get_slice(k).get_shape()), fh.get_slice(k).get_dtype()) for k in fh.keys()}
    try:
        state = torch.load(file, map_location="meta", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise ConversionError(f"{file} cannot be read as plain weights ({type(err).__name__}: "
                            f"{str(err).strip().splitlines()[0][:200] if str(err).strip() else 'damaged'}); "
                            "it is damaged or holds objects other than tensors") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    return {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in state.items() if hasattr(v, "shape")}


def group_components(tensors: dict, family) -> dict[str, dict]:
    """Tensors, parameters and dtypes per component of `family` (or per top-level name without one)."""
    groups: dict[str, dict] = defaultdict(lambda: {"tensors": 0, "params": 0, "dtypes": set()})
    for key, (shape, dtype) in tensors.items():
        name = family.canonical_key(key.removeprefix("base_model.model.")) if family else key
        component = (family.component_of(name) if family else None) or ("lora" if "lora_" in key else key.split(".")[0])
        group = groups[component]
        group["tensors"] += 1
        group["params"] += int(torch.Size(shape).numel())
        group["dtypes"].add(dtype)
    return {c: {**g, "dtypes": sorted(g["dtypes"])} for c, g in groups.items()}
