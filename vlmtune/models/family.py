"""The `Family` interface: everything vlmtune needs to know about one VLM architecture.

A family names its components (any number, any names) by module-path prefixes, says how an image
becomes placeholder tokens and model inputs (by default through the transformers processor's own
`replace_image_token` protocol, so the ids vlmtune trains on are the ids the processor produces),
where it needs explicit position ids, how to build one from parts, and which foreign checkpoint
layouts it reads. Nothing outside `vlmtune/models/` names a particular family.
"""

from __future__ import annotations

import difflib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from torch import nn

PEFT_PREFIX = "base_model.model."


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model itself, under a PEFT wrapper if there is one."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class FamilyError(ValueError):
    """A model that does not fit a family (unknown type, unassigned parameters, a missing package)."""


@dataclass(frozen=True)
class LoadOptions:
    """Passed through every load (train, verify, merge, export, inspect, inference)."""

    trust_remote_code: bool = False
    dtype: str | None = None  # "float32" | "bfloat16" | "float16" | None (as saved)
    attn_implementation: str | None = None  # "sdpa" | "eager" | "flash_attention_2" | None (default)
    device_map: str | None = None
    # QLoRA: (bits, quant type, double quant, compute dtype, quantized component names)
    quantize: tuple[int, str, bool, str, tuple[str, ...]] | None = None

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `from_pretrained` (trust_remote_code always explicit: never prompt)."""
        out: dict[str, Any] = {"trust_remote_code": self.trust_remote_code}
        if self.dtype:
            out["dtype"] = self.dtype
        if self.attn_implementation:
            out["attn_implementation"] = self.attn_implementation
        if self.device_map:
            out["device_map"] = self.device_map
        return out


class ConversionError(ValueError):
    """A layout that cannot be read, merged or converted; the message names the file or tensor and
    what to do. Raised by the families' layouts and by `vlmtune.convert`."""


@dataclass(frozen=True)
class ConvertOptions:
    """What `vlmtune convert` / `merge` add to a foreign layout's load: parts that are not on disk where
    the source says, leftovers the user accepts, the conversation format."""

    vision: Path | None = None  # overrides the vision tower the source names (e.g. a hub id not on disk)
    llm: Path | None = None  # overrides the base LLM the source names
    allow_unused: bool = False
    allow_missing: bool = False
    chat_template: str | None = None  # a built-in template name or a .jinja file
    command: str | None = None  # "convert" when the user ran it (messages then suggest its flags)


@dataclass(frozen=True)
class Layout:
    """A checkpoint layout vlmtune reads: how to recognise it, load it and describe it."""

    name: str  # e.g. "original LLaVA repository folder"
    detect: Callable[[Path], bool]
    load: Callable[..., Any]  # (path, options: LoadOptions, convert: ConvertOptions) -> LoadedModel
    describe: Callable[[Path], dict] | None = None  # plain data for `vlmtune inspect`
    hint: str = ""  # what to do with it, for messages
    parts: Callable[..., Any] | None = None  # (path, parts) -> parts, for `vlmtune merge --from`


@dataclass(frozen=True)
class Family:
    name: str
    # component name -> module path prefixes inside the model; the longest matching prefix wins
    components: dict[str, tuple[str, ...]]
    matches: Callable[[Any], bool]  # (transformers config) -> bool
    model_class: type | None = None  # loads a full folder; None: AutoModelForImageTextToText
    # tokens the chat template writes around an image's placeholder; they belong to its block
    image_wrappers: tuple[str, ...] = ()
    build: Callable[..., tuple[nn.Module, Any]] | None = None  # (vision, llm, projector, options) -> (model, processor)
    key_renames: tuple[tuple[str, str], ...] = ()  # older key namings -> current module paths
    layouts: tuple[Layout, ...] = ()
    # (parts: convert.merge.Parts, base: LoadedModel | None) -> LoadedModel: `vlmtune merge`
    merge: Callable[..., Any] | None = None
    # `vlmtune export --format NAME`: module path prefix -> the other tool's prefix
    export_renames: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = ()
    # (model, batch) -> position ids, where the model needs more than 0..n-1 (Qwen's 3-row rope)
    position_ids: Callable[[nn.Module, dict], Any] | None = None
    requires: tuple[str, ...] = ()  # Python packages its processor needs, e.g. ("torchvision",)
    token_type_keys: tuple[str, ...] = ()  # per-token model inputs the encoder must produce
    # image inputs a batch joins along another dim than 0 (MiniCPM-V 4.6 lays all patches along the width)
    concat_dims: tuple[tuple[str, int], ...] = ()
    # `data.packing`: tested to give the loss of unpacked samples (tests/families/test_packing.py)
    packing: bool = False
    # (component, leader): a component split out of another (MiniCPM-V's embeddings out of the LLM) that,
    # unless `tune` names it, is trained in full when its leader is and frozen otherwise (as before the split)
    follows: tuple[tuple[str, str], ...] = ()
    # (model) -> names of modules whose output never reaches the loss (LLaVA's vision layers after
    # `vision_feature_layer`): training runs them as identities (vlmtune.models.skipped)
    unused_layers: Callable[[nn.Module], list[str]] | None = None
    notes: str = ""

    def quantization_config(self, options: LoadOptions) -> dict[str, Any]:
        """`from_pretrained` arguments that load the chosen components quantized, the others not."""
        if options.quantize is None:
            return {}
        try:
            import bitsandbytes  # noqa: F401
            import torch
            from transformers import BitsAndBytesConfig
        except ImportError:
            raise FamilyError("`tune.quantize` needs bitsandbytes: pip install 'vlmtune[qlora]'") from None
        bits, kind, double, compute, quantized = options.quantize
        unknown = [c for c in quantized if c not in self.components]
        if unknown:
            raise FamilyError(f"`tune.quant.components`: the {self.name} family has no component {unknown[0]!r} "
                              f"(its components: {', '.join(self.components)})")
        if compute == "auto":
            compute = "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"
        keep = [p for c, prefixes in self.components.items() if c not in quantized for p in prefixes] + ["lm_head"]
        config = BitsAndBytesConfig(load_in_4bit=bits == 4, load_in_8bit=bits == 8, bnb_4bit_quant_type=kind,
                                    bnb_4bit_use_double_quant=double, bnb_4bit_compute_dtype=getattr(torch, compute),
                                    llm_int8_skip_modules=keep)
        return {"quantization_config": config, "device_map": options.device_map or (0 if torch.cuda.is_available() else "cpu")}

    def layers_not_run(self, model: nn.Module) -> list[str]:
        """`unused_layers` of this model: the modules training runs as identities (none by default)."""
        return self.unused_layers(model) if self.unused_layers else []

    def canonical_key(self, key: str) -> str:
        """A weight name as the current transformers module tree spells it."""
        for old, new in self.key_renames:
            if key.startswith(old):
                return new + key[len(old):]
        return key

    def component_of(self, name: str) -> str | None:
        """The component a parameter or module name belongs to (longest prefix; PEFT's wrapper ignored)."""
        name = name.removeprefix(PEFT_PREFIX)
        best, best_len = None, -1
        for component, prefixes in self.components.items():
            for prefix in prefixes:
                if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best_len:
                    best, best_len = component, len(prefix)
        return best

    def check_requirements(self) -> None:
        """One sentence naming the missing package, before anything loads."""
        missing = [pkg for pkg in self.requires if importlib.util.find_spec(pkg) is None]
        if missing:
            raise FamilyError(
                f"the {self.name} family's processor needs {', '.join(missing)}: pip install {' '.join(missing)} "
                f"(on x86_64: pip install torch==2.14.1 torchvision==0.29.1)")

    def uncovered(self, model: nn.Module) -> list[str]:
        """Parameters in no component: an error, never silently frozen."""
        return [name for name, _ in model.named_parameters() if self.component_of(name) is None]

    def check_components(self, model: nn.Module) -> None:
        missing = self.uncovered(model)
        if missing:
            raise FamilyError(
                f"{len(missing)} parameter(s) of this {self.name} model belong to no component "
                f"({', '.join(self.components)}): {missing[:8]}; name them in `model.components`")

    def closest_component(self, name: str) -> str | None:
        found = difflib.get_close_matches(name, list(self.components), n=1)
        return found[0] if found else None


def model_type_is(name: str) -> Callable[[Any], bool]:
    """The usual `matches`: a config of this `model_type`."""
    return lambda config: getattr(config, "model_type", None) == name


def custom_family(model_type: str, components: dict[str, list[str]]) -> Family:
    """A model vlmtune has no family for, with the component map the user gave in `model.components`
    (module-path prefixes); it loads through `AutoModelForImageTextToText` and the processor's protocol."""
    return Family(name=f"custom ({model_type})", components={c: tuple(p) for c, p in components.items()},
                  matches=model_type_is(model_type))

