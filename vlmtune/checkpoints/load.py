"""Load any model folder vlmtune writes — full, LoRA adapter on its base, or delta on its base — and
say where each component's weights came from."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from vlmtune.checkpoints.manifest import ManifestError, check_on_load, model_fingerprint, read_manifest
from vlmtune.checkpoints.save import DELTA_WEIGHTS
from vlmtune.models.family import ConvertOptions, Family, FamilyError, LoadOptions, custom_family
from vlmtune.models.loaded import LoadedModel
from vlmtune.models.registry import family_for, layout_for


class ModelLoadError(ValueError):
    """A model folder that cannot be loaded; the message names the folder and what to do."""


FOLDERS_THAT_WORK = ("A model path takes a vision-language model folder (vlmtune or transformers), a vlmtune LoRA "
                     "adapter or delta folder, an XTuner pth_to_hf folder or an original LLaVA folder.")
PLAIN_LLM = (" This folder holds a language model without a vision encoder: to build a new VLM from it, give it as "
             "`model.llm` together with a vision encoder folder as `model.vision` (stage 1).")
def remote_code_refused(err: BaseException) -> str | None:
    """transformers' refusal to run a folder's own code (trust_remote_code off), in one sentence."""
    found = re.search(r"repository (\S+) (?:contains|references) custom code", str(err))
    if not isinstance(err, ValueError) or not found:
        return None
    return (f"{found[1]} holds its own model code (named by `auto_map` in its config), which vlmtune does not run "
            "unless told to: if you trust the folder, pass --trust-remote-code (train: model.trust_remote_code=true)")


def has_processor(folder: Path) -> bool:
    return (folder / "processor_config.json").is_file() or (folder / "preprocessor_config.json").is_file()


def _base_folder(folder: Path, recorded: str | None, what: str) -> Path:
    if not recorded:
        raise ModelLoadError(f"{folder}: {what} records no base model; cannot find the weights it builds on")
    base = Path(recorded)
    if not base.is_absolute() and (folder / base).exists():
        base = folder / base
    if not (base / "config.json").is_file():
        raise ModelLoadError(
            f"{folder} needs its base model {recorded}, which is not a model folder here; "
            f"put the base there (or fix the path in {what})"
        )
    return base


def recorded_components(folder: Path) -> dict[str, list[str]] | None:
    """The component map a vlmtune folder's manifest recorded (for models no family describes)."""
    return (read_manifest(folder) or {}).get("family_components") if (folder / "vlmtune.json").is_file() else None


def resolve_family(folder: Path, config, components: dict[str, list[str]] | None = None,
                   recorded: dict[str, list[str]] | None = None) -> Family:
    """The family of a folder: the user's component map, the registry's, or the one a manifest recorded
    (the folder's own, or that of the adapter or delta that needs this base)."""
    if components is None:
        recorded = recorded or recorded_components(folder)
        try:
            return family_for(config, where=str(folder))
        except ValueError:
            if not recorded:
                raise
            components = recorded
    return custom_family(getattr(config, "model_type", "custom"), components)


def load_model(path: str | Path, *, trust_remote_code: bool = False, merge_adapters: bool = True,
               options: LoadOptions | None = None, components: dict[str, list[str]] | None = None,
               recorded: dict[str, list[str]] | None = None, check: bool = True) -> LoadedModel:
    """Load `path` for training or inference; adapters are applied to their base (merged by default).

    A vlmtune folder is first checked against its manifest (`check_on_load`; `check=False` when the
    caller has just hashed it); what still fails to load is one sentence naming the folder."""
    options = options or LoadOptions(trust_remote_code=trust_remote_code)
    folder = Path(path)
    if not folder.is_dir():
        raise ModelLoadError(f"model path {folder} is not a folder")
    if options.quantize and ((folder / "adapter_config.json").is_file() or (folder / DELTA_WEIGHTS).is_file()):
        raise ModelLoadError(f"{folder} is an adapter or delta; `tune.quantize` loads a full model folder quantized: "
                             "merge it first (vlmtune merge / vlmtune export --format hf) or drop tune.quantize")
    try:
        if check:
            check_on_load(folder)
        return _load(folder, options, merge_adapters, components, recorded)
    except (ModelLoadError, FamilyError):
        raise
    except ManifestError as err:
        raise ModelLoadError(str(err)) from None
    except (OSError, ValueError, RuntimeError, KeyError, pickle.UnpicklingError, SafetensorError) as err:
        if remote_code_refused(err):
            raise ModelLoadError(remote_code_refused(err)) from None
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ModelLoadError(f"{folder}: the model cannot be loaded ({type(err).__name__}: {first[:300]}); "
                             f"run `vlmtune verify {folder}` to find the damaged file") from None


def _load(folder: Path, options: LoadOptions, merge_adapters: bool, components, recorded) -> LoadedModel:
    trust_remote_code = options.trust_remote_code
    if (folder / "adapter_config.json").is_file():
        return _load_adapter(folder, options, merge_adapters, components)
    if (folder / DELTA_WEIGHTS).is_file():
        return _load_delta(folder, options, components)
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder} is not a model folder: it has neither config.json nor adapter_config.json")
    found = layout_for(folder)  # a family's own layout (e.g. MiniCPM-V 2.x), also as an adapter's base
    if found and components is None:
        return found[1].load(folder, options, ConvertOptions())
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    try:
        family = resolve_family(folder, config, components, recorded)
    except ValueError as err:
        raise ModelLoadError(f"{err}. {FOLDERS_THAT_WORK}" + (PLAIN_LLM if not hasattr(config, "vision_config") else "")) from None
    family.check_requirements()
    if not has_processor(folder):
        raise ModelLoadError(f"{folder} has no processor_config.json or preprocessor_config.json: the image processor is missing")
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=trust_remote_code)
    model_class = family.model_class or AutoModelForImageTextToText
    model, info = model_class.from_pretrained(folder, output_loading_info=True,
                                              **{**options.kwargs(), **family.quantization_config(options)})
    loaded = LoadedModel(model, processor, family, folder, "full", sources={c: f"{folder}" for c in family.components})
    _explain(loaded, info.get("missing_keys", []), info.get("unexpected_keys", []), info.get("mismatched_keys", []))
    return loaded


def _explain(loaded: LoadedModel, missing, unexpected, mismatched) -> None:
    """Turn transformers' key lists into one sentence per component."""
    by_component: dict[str, list[str]] = {}
    for key in missing:
        by_component.setdefault(loaded.family.component_of(key) or "other", []).append(key)
    for component, keys in by_component.items():
        if component in loaded.sources:
            loaded.sources[component] = f"NEWLY INITIALISED ({len(keys)} tensor(s) not in {loaded.path}, e.g. {keys[0]})"
        else:
            loaded.notes.append(f"{len(keys)} tensor(s) outside any component were newly initialised, e.g. {keys[0]}")
    if unexpected:
        loaded.notes.append(f"{len(unexpected)} tensor(s) in {loaded.path} match no parameter of the model and were "
                            f"ignored, e.g. {list(unexpected)[:3]}: the folder may be from another architecture")
    if mismatched:
        loaded.notes.append(f"{len(mismatched)} tensor(s) had the wrong shape and were re-initialised: {list(mismatched)[:3]}")


def _load_adapter(folder: Path, options: LoadOptions, merge: bool, components=None) -> LoadedModel:
    from peft import PeftModel

    adapter = json.loads((folder / "adapter_config.json").read_text())
    base_path = _base_folder(folder, adapter.get("base_model_name_or_path"), "adapter_config.json")
    base_config = json.loads((base_path / "config.json").read_text())
    if adapter.get("task_type") == "CAUSAL_LM" and "vision_config" not in base_config and components is None \
            and not (base_path / "vlmtune.json").is_file():
        raise ModelLoadError(
            f"{folder} is a LoRA adapter on {base_path}, a text-only LLM ({base_config.get('model_type')}), not on a "
            f"vision-language model; merge it into one with `vlmtune merge --base VLM --llm-adapter {folder} --out OUT` "
            "(or --llm LLM --vision VISION --projector P instead of --base)")
    base = load_model(base_path, options=options, components=components, recorded=recorded_components(folder))
    model = PeftModel.from_pretrained(base.model, folder)
    lora, full = set(), set()
    for name, module in model.named_modules():
        component = base.family.component_of(name)
        if component and hasattr(module, "lora_A"):
            lora.add(component)
        if component and name.endswith("modules_to_save"):
            full.add(component)
    if merge:
        model = model.merge_and_unload()
    processor = (AutoProcessor.from_pretrained(folder, trust_remote_code=options.trust_remote_code)
                 if has_processor(folder) else base.processor)
    sources = {c: (f"{folder} (fully trained, saved with the adapter)" if c in full else
                   f"{base.path} + LoRA from {folder}" if c in lora else f"{base.path}")
               for c in base.family.components}
    return LoadedModel(model, processor, base.family, folder, "lora", base=base.path, sources=sources, notes=base.notes)


def _load_delta(folder: Path, options: LoadOptions, components=None) -> LoadedModel:
    manifest = read_manifest(folder) or {}
    recorded = manifest.get("base", {})
    base_path = _base_folder(folder, recorded.get("path"), "vlmtune.json")
    if recorded.get("fingerprint") and model_fingerprint(base_path) != recorded["fingerprint"]:
        raise ModelLoadError(
            f"{folder} is a delta on {base_path}, but that folder is not the base it was trained from "
            "(its config or weights differ from the fingerprint recorded in vlmtune.json); "
            "restore the original base or load a full checkpoint"
        )
    base = load_model(base_path, options=options, components=components, recorded=recorded_components(folder))
    delta = load_file(str(folder / DELTA_WEIGHTS))
    result = base.model.load_state_dict(delta, strict=False)
    if result.unexpected_keys:
        raise ModelLoadError(f"{folder}/{DELTA_WEIGHTS} holds {len(result.unexpected_keys)} tensor(s) the base model "
                             f"does not have, e.g. {result.unexpected_keys[:3]}")
    tuned = {base.family.component_of(k) for k in delta}
    processor = (AutoProcessor.from_pretrained(folder, trust_remote_code=options.trust_remote_code)
                 if has_processor(folder) else base.processor)
    sources = {c: (f"{folder} (delta)" if c in tuned else f"{base.path}") for c in base.family.components}
    return LoadedModel(base.model, processor, base.family, folder, "delta", base=base.path, sources=sources)
