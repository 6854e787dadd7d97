"""Weights the original LLaVA repository and XTuner write, into a transformers LLaVA model.

Key namings: transformers 4's CLIP / SigLIP vision models had a `vision_model.` level that 5's do not;
the original repository nests the tower as `model.vision_tower.vision_tower.vision_model.*` and the
projector as `model.mm_projector.{0,2}.*`; XTuner's `LLaVAModel` uses `llm.*`, `visual_encoder.*`,
`projector.model.{0,2}.*`. Every source tensor must land somewhere and every parameter be filled;
what is left over is listed, and modules that compute in the source are never dropped.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn
from transformers import CONFIG_MAPPING, AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer

from vlmtune.data.templates import resolve_template
from vlmtune.models.family import ConversionError, ConvertOptions, LoadOptions
from vlmtune.models.llava.build import build_from_parts, load_vision

ORIGINAL_TOWER = "model.vision_tower.vision_tower."  # the original repository's CLIPVisionTower wrapper
TRANSFORMERS4_VISION = "vision_model."  # the level transformers 4's vision models had
TRANSFORMERS4_RENAMES = (
    ("model.vision_tower.vision_model.", "model.vision_tower."),
    ("vision_tower.vision_model.", "model.vision_tower."),
)
XTUNER_RENAMES = (  # XTuner's LLaVAModel state dict (`pretrained_pth`, iter_N.pth)
    ("projector.model.0.", "model.multi_modal_projector.linear_1."),
    ("projector.model.2.", "model.multi_modal_projector.linear_2."),
    ("llm.model.", "model.language_model."),
    ("llm.lm_head.", "lm_head."),
    ("visual_encoder.vision_model.", "model.vision_tower."),
    ("visual_encoder.", "model.vision_tower."),
)
XTUNER_EXPORT = (
    ("model.multi_modal_projector.linear_1.", "projector.model.0."),
    ("model.multi_modal_projector.linear_2.", "projector.model.2."),
    ("model.language_model.", "llm.model."),
    ("lm_head.", "llm.lm_head."),
    ("model.vision_tower.", "visual_encoder.vision_model."),
)
DERIVED_BUFFERS = re.compile(r"\.rotary_emb\.inv_freq$")  # transformers 4.31 saved them; recomputed today
# tensors of modules that compute in a Mini-Gemini model (auxiliary ConvNeXt tower, patch-info mining)
MGM_MODULES = ("model.vision_tower_aux.", "model.vlm_uni_query_projector.", "model.vlm_uni_aux_projector.",
               "model.vlm_uni_val_projector.")
MGM_MESSAGE = ("a Mini-Gemini checkpoint (auxiliary high-resolution tower and patch-info mining modules, which a "
               "LLaVA model does not have: dropping them changes what the model computes); use the mgm family "
               "(vlmtune has none yet: until it lands, keep using Mini-Gemini's own code for this model)")
NEXT_MODULES = ("model.image_newline",)
NEXT_MESSAGE = ("an original-repository LLaVA-1.6 (LLaVA-NeXT) checkpoint (anyres image tiling and the image_newline "
                "embedding, which LLaVA-1.5 does not have: converting it as LLaVA would change what it computes); vlmtune "
                "does not convert these folders yet; the llava_next family reads transformers' LLaVA-NeXT folders "
                "(e.g. llava-hf/llava-v1.6-vicuna-7b-hf)")
# tensors that compute in a format a LLaVA model cannot hold: never dropped, whatever the flags
COMPUTING = ((MGM_MODULES, MGM_MESSAGE), (NEXT_MODULES, NEXT_MESSAGE))

# the original repository's conversation modes (`--version` / `conv_mode`) -> vlmtune's built-in templates
CONVERSATION_TEMPLATES = {
    "v1": "vicuna_v1", "vicuna_v1": "vicuna_v1", "llava_v1": "vicuna_v1",
    "llama_2": "llama_2", "llava_llama_2": "llama_2",
    "mistral_instruct": "mistral_instruct",
    "chatml_direct": "chatml", "mistral_direct": "chatml", "mpt": "chatml",
}
XTUNER_TEMPLATES = {"vicuna": "vicuna_v1", "llama2_chat": "llama_2", "mistral": "mistral_instruct",
                    "internlm2_chat": "chatml", "qwen_chat": "chatml", "chatml": "chatml"}


def read_state_dict(path):
    from vlmtune.models.weights import read_state_dict as read

    return read(path)


# ---------------------------------------------------------------- key names

def strip_vision_level(key: str) -> str:
    return key.removeprefix(TRANSFORMERS4_VISION)


def llm_key(key: str) -> str:
    """An LLM adapter's module path inside a LLaVA model (adapters on the bare LLM or on the VLM)."""
    from vlmtune.models.llava.family import LLAVA

    key = LLAVA.canonical_key(key)
    if key.startswith(("model.language_model.", "lm_head.")):
        return key
    return "model.language_model." + key.removeprefix("model.")


def vision_key(key: str) -> str:
    """A vision adapter's module path inside a LLaVA model (on the bare tower, transformers 4 or 5 naming)."""
    from vlmtune.models.llava.family import LLAVA

    key = LLAVA.canonical_key(strip_vision_level(key))
    return key if key.startswith("model.vision_tower.") else "model.vision_tower." + key


# ---------------------------------------------------------------- projectors

# XTuner `projector/` (model.0, model.2), original LLaVA (model.mm_projector.0/.2, or a single linear
# model.mm_projector), transformers (multi_modal_projector.linear_1/2)
_PROJECTOR_PATTERNS = [
    (re.compile(r"^(?:.*\.)?(?:mm_projector|projector\.model|model)\.0\.(weight|bias)$"), "linear_1"),
    (re.compile(r"^(?:.*\.)?(?:mm_projector|projector\.model|model)\.2\.(weight|bias)$"), "linear_2"),
    (re.compile(r"^(?:.*\.)?multi_modal_projector\.(linear_[12])\.(weight|bias)$"), None),
    (re.compile(r"^(?:.*\.)?mm_projector\.(weight|bias)$"), "linear"),
]


def projector_weights(source) -> dict[str, torch.Tensor]:
    """`linear_1.*` / `linear_2.*` (or `linear.*` for a single-layer projector) from any projector layout."""
    state = source if isinstance(source, dict) else read_state_dict(source)
    out, unused = {}, []
    for key, tensor in state.items():
        for pattern, target in _PROJECTOR_PATTERNS:
            match = pattern.match(key)
            if match:
                name = f"{match.group(1)}.{match.group(2)}" if target is None else f"{target}.{match.group(1)}"
                out[name] = tensor
                break
        else:
            if "projector" in key:
                unused.append(key)
    where = "the projector tensors" if isinstance(source, dict) else source
    if unused:
        raise ConversionError(f"{where}: projector tensor(s) of an unknown layout: {unused[:5]}")
    if not out:
        raise ConversionError(f"{where}: no projector weights found (expected mm_projector.*, model.0/2.* or "
                              "multi_modal_projector.*)")
    return out


def apply_projector(model: nn.Module, weights: dict[str, torch.Tensor], source: str) -> str:
    """Copy projector weights into a LLaVA model; returns its kind (`mlp2x_gelu` or `linear`)."""
    projector = model.model.multi_modal_projector
    if "linear.weight" in weights:  # a single linear layer: first layer + identity second layer
        weights = {"linear_1.weight": weights["linear.weight"], "linear_1.bias": weights.get("linear.bias"),
                   "linear_2.weight": torch.eye(projector.linear_2.out_features, projector.linear_2.in_features),
                   "linear_2.bias": torch.zeros(projector.linear_2.out_features)}
        kind = "linear"
    else:
        kind = "mlp2x_gelu"
    targets = dict(projector.named_parameters())
    for name, tensor in weights.items():
        if tensor is None:
            continue
        if name not in targets:
            raise ConversionError(f"{source}: projector tensor {name} has no place in the model")
        if tensor.shape != targets[name].shape:
            raise ConversionError(
                f"{source}: projector tensor {name} has shape {tuple(tensor.shape)} but the model needs "
                f"{tuple(targets[name].shape)}; the projector was trained for another vision encoder or LLM width")
        with torch.no_grad():
            targets[name].copy_(tensor.to(targets[name].dtype))
    if kind == "linear":
        model.config.projector_hidden_act = "linear"
        projector.act = nn.Identity()
    return kind


def projector_kind(weights: dict[str, torch.Tensor]) -> str:
    return "linear" if "linear.weight" in weights else "mlp2x_gelu"


# ---------------------------------------------------------------- configs

def read_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def is_original_config(config: dict) -> bool:
    return any(key in config for key in ("mm_vision_tower", "mm_projector_type", "mm_hidden_size"))


def is_original_next(config: dict) -> bool:
    """LLaVA-1.6 trained with the original repository: anyres tiling, spatial patch merging."""
    return "anyres" in str(config.get("image_aspect_ratio", "")) or \
        str(config.get("mm_patch_merge_type", "flat")).startswith("spatial")


def is_mgm(folder: Path) -> bool:
    """A Mini-Gemini folder: its model type, its auxiliary tower, or its mining modules' tensors."""
    if not (folder / "config.json").is_file():
        return False
    config = read_config(folder)
    if "vision_aux_config" in config:  # vlmtune's own Mini-Gemini: a model folder the mgm family loads
        return False
    if str(config.get("model_type", "")).startswith("mgm") or "mm_vision_tower_aux" in config:
        return True
    return any(arch.startswith("MGM") for arch in config.get("architectures") or [])


def feature_choice(config: dict) -> tuple[int, bool]:
    """(vision layer, drop CLS) from `mm_vision_select_layer` / `mm_vision_select_feature`."""
    feature = config.get("mm_vision_select_feature", "patch")
    if feature not in ("patch", "cls_patch"):
        raise ConversionError(f"mm_vision_select_feature {feature!r} is not one vlmtune reads (patch, cls_patch)")
    return int(config.get("mm_vision_select_layer", -2)), feature == "patch"


def conversation_template(config: dict, folder: Path, explicit: str | None) -> tuple[str, str]:
    """The built-in template (or .jinja file) matching the conversation mode the source was trained with,
    and why it was chosen. The original repository does not save its mode: it is `--chat-template`, a
    `conv_mode` / `version` field some forks save, the LLM's architecture, or LLaVA's own name rules."""
    if explicit:
        return explicit, "--chat-template"
    for key in ("conv_mode", "version"):
        if config.get(key) in CONVERSATION_TEMPLATES:
            return CONVERSATION_TEMPLATES[config[key]], f"config.json {key} {config[key]!r}"
    arch = " ".join(config.get("architectures") or [])
    names = f"{folder.name} {config.get('_name_or_path', '')}".lower()
    if "Mistral" in arch or "mistral" in names:
        return "mistral_instruct", "a Mistral LLM (LLaVA's mistral_instruct mode)"
    if "Mpt" in arch or "34b" in names:
        return "chatml", "LLaVA's chatml / mpt mode for this LLM"
    if re.search(r"llama-?2", names) and "chat" in names:
        return "llama_2", "a Llama-2-chat LLM (LLaVA's llava_llama_2 mode)"
    return "vicuna_v1", ("LLaVA-1.5's mode (llava_v1, Vicuna v1), the original repository's default for Llama "
                         "LLMs; give --chat-template if it was trained with another")


def text_config(config: dict):
    """The LLM's config from an original-LLaVA config (`llava_llama` -> a Llama config, etc.)."""
    base = str(config.get("model_type", "llava_llama")).removeprefix("llava_") or "llama"
    if base not in CONFIG_MAPPING:
        raise ConversionError(f"config.json model_type {config.get('model_type')!r}: no transformers LLM named {base!r}")
    cls = CONFIG_MAPPING[base]
    known = set(cls().to_dict())
    return cls(**{k: v for k, v in config.items() if k in known and k not in ("model_type", "architectures")})


def local_folder(name, override: Path | None, what: str, flag: str, where: Path) -> Path:
    """A part the source names (by path or hub id), or the override; it must be a folder here."""
    folder = override or (Path(name) if name else None)
    if folder is None or not (folder / "config.json").is_file():
        raise ConversionError(f"{where}: its {what} {str(folder or name)!r} is not a model folder here; download it and give "
                              f"{flag} DIR (vlmtune convert {where} {flag} DIR --out OUT, then train from OUT)")
    return folder


def parts_options(options: LoadOptions) -> LoadOptions:
    """Parts load in float32 unless a dtype is asked for: transformers 5 would load each in the dtype
    its config records (a fp16 LLM beside a fp32 tower), and a conversion should lose nothing."""
    return replace(options, dtype=options.dtype or "float32")


def has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))


def load_tokenizer(folder: Path, options: LoadOptions):
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=options.trust_remote_code)
    except (ImportError, ValueError) as err:
        if (folder / "tokenizer.model").is_file() and not (folder / "tokenizer.json").is_file():
            raise ConversionError(f"{folder}/tokenizer.model: a SentencePiece tokenizer, which transformers converts only with "
                                  f"sentencepiece and protobuf installed (pip install sentencepiece protobuf); {err}") from None
        raise


# ---------------------------------------------------------------- accounting

def check_accounting(source: str, unused: list[str], unfilled: list[str], convert: ConvertOptions) -> list[str]:
    """The generic accounting (`models.parts.check_accounting`), after refusing to drop tensors of
    modules that compute in the source, whatever the flags."""
    from vlmtune.models.parts import check_accounting as account

    for prefixes, message in COMPUTING:
        computing = [k for k in unused if k.startswith(prefixes)]
        if computing:
            raise ConversionError(f"{source}: {message} ({len(computing)} tensor(s) such as {computing[0]})")
    return account(source, unused, unfilled, convert)


# ---------------------------------------------------------------- the original repository's folders

def _compose(folder: Path, config: dict, llm, tokenizer, state: dict, vision: Path, convert: ConvertOptions,
             options: LoadOptions, unused: list[str], unfilled: list[str], sources: dict):
    """The parts of an original-LLaVA source into one model: its LLM (loaded), the remaining tensors
    (projector, tower, anything else), the tower folder for what the checkpoint does not carry."""
    from vlmtune.models.loaded import LoadedModel
    from vlmtune.models.llava.family import LLAVA

    if config.get("mm_use_im_start_end"):
        raise ConversionError(f"{folder}/config.json: mm_use_im_start_end is set (image start/end tokens), which vlmtune "
                              "does not convert")
    vision_model = load_vision(str(vision), parts_options(options))
    tower = {strip_vision_level(k.removeprefix(ORIGINAL_TOWER)): v for k, v in state.items() if k.startswith(ORIGINAL_TOWER)}
    if tower:  # the checkpoint carries its (possibly tuned) tower: it wins over the folder's
        result = vision_model.load_state_dict(tower, strict=False)
        unused += [ORIGINAL_TOWER + k for k in result.unexpected_keys]
        unfilled += [f"vision {k}" for k in result.missing_keys]
    projector = {k: v for k, v in state.items() if "mm_projector" in k}
    unused += [k for k in state if not k.startswith(ORIGINAL_TOWER) and k not in projector]
    if not projector:
        raise ConversionError(f"{folder}: no projector weights (model.mm_projector.*) in its weight files")
    weights = projector_weights(projector)
    layer, drop_cls = feature_choice(config)
    template, why = conversation_template(config, folder, convert.chat_template)
    model, processor = build_from_parts(
        vision_model, AutoImageProcessor.from_pretrained(vision, trust_remote_code=options.trust_remote_code), llm,
        tokenizer, projector_kind(weights),
        vision_feature_layer=layer, drop_cls=drop_cls, chat_template=resolve_template(template))
    apply_projector(model, weights, f"{folder} model.mm_projector")
    notes = check_accounting(str(folder), unused, unfilled, convert)
    notes.append(f"chat template: {template} (from {why})")
    sources = {"vision": f"{folder} (tower tensors)" if tower else str(vision), **sources}
    return LoadedModel(model, processor, LLAVA, folder, "converted", sources=sources, notes=notes)


def without_derived(state: dict) -> dict:
    """The state without buffers transformers recomputes (4.31's rotary `inv_freq`)."""
    return {k: v for k, v in state.items() if not DERIVED_BUFFERS.search(k)}


def convert_original(folder: Path, options: LoadOptions = LoadOptions(), convert: ConvertOptions = ConvertOptions()):
    """A full original-LLaVA folder (`LlavaLlamaForCausalLM`: LLM, projector, sometimes the tower)."""
    config = read_config(folder)
    state = without_derived(read_state_dict(folder))
    vision = local_folder(config.get("mm_vision_tower"), convert.vision, "vision tower (mm_vision_tower)", "--vision", folder)
    llm = AutoModelForCausalLM.from_config(text_config(config))
    llm_state = {k: v for k, v in state.items() if not k.startswith(("model.mm_projector", "model.vision_tower"))
                 and not k.startswith(MGM_MODULES)}
    result = llm.load_state_dict(llm_state, strict=False)
    tied = {"lm_head.weight"} if llm.config.tie_word_embeddings else set()
    tokenizer_dir = folder if has_tokenizer(folder) else None
    if tokenizer_dir is None and convert.llm is None:
        raise ConversionError(f"{folder}: no tokenizer files; copy the LLM's tokenizer into the folder or give --llm LLM_DIR")
    rest = {k: v for k, v in state.items() if k not in llm_state}
    return _compose(folder, config, llm, load_tokenizer(tokenizer_dir or convert.llm, options), rest, vision, convert,
                    options, list(result.unexpected_keys), [k for k in result.missing_keys if k not in tied],
                    {"projector": f"{folder} model.mm_projector", "llm": str(folder)})


def convert_lora_output(folder: Path, options: LoadOptions = LoadOptions(), convert: ConvertOptions = ConvertOptions()):
    """The original repository's `--lora_enable` output: a PEFT adapter on the LLM, `non_lora_trainables.bin`
    (projector, any other trained tensors) and the `mm_*` config; the base LLM and tower it names."""
    from vlmtune.models.parts import merge_adapter

    config = read_config(folder)
    adapter = json.loads((folder / "adapter_config.json").read_text())
    llm_dir = local_folder(adapter.get("base_model_name_or_path"), convert.llm,
                           "base LLM (adapter_config.json base_model_name_or_path)", "--llm", folder)
    vision = local_folder(config.get("mm_vision_tower"), convert.vision, "vision tower (mm_vision_tower)", "--vision", folder)
    llm = AutoModelForCausalLM.from_pretrained(llm_dir, **parts_options(options).kwargs())
    llm = merge_adapter(llm, folder)
    trainables = folder / "non_lora_trainables.bin"
    state = read_state_dict(trainables) if trainables.is_file() else {}
    state = {k.removeprefix("base_model.model."): v for k, v in state.items()}
    llm_state = {k: v for k, v in state.items() if not k.startswith(("model.mm_projector", "model.vision_tower"))}
    unused = []
    if llm_state:  # trained outside LoRA (e.g. embeddings): they replace the base's
        unused = list(llm.load_state_dict(llm_state, strict=False).unexpected_keys)
    rest = {k: v for k, v in state.items() if k not in llm_state}
    tokenizer_dir = folder if has_tokenizer(folder) else llm_dir
    return _compose(folder, config, llm, load_tokenizer(tokenizer_dir, options), rest, vision, convert, options, unused,
                    [], {"projector": str(trainables), "llm": f"{llm_dir} + LoRA {folder} (merged)"})


def convert_stage1(folder: Path, options: LoadOptions = LoadOptions(), convert: ConvertOptions = ConvertOptions()):
    """The original repository's stage-1 output (`--tune_mm_mlp_adapter`): config + `mm_projector.bin`; the
    LLM is the config's `_name_or_path`, the tower its `mm_vision_tower`."""
    config = read_config(folder)
    llm_dir = local_folder(config.get("_name_or_path"), convert.llm, "base LLM (config.json _name_or_path)", "--llm", folder)
    vision = local_folder(config.get("mm_vision_tower"), convert.vision, "vision tower (mm_vision_tower)", "--vision", folder)
    llm = AutoModelForCausalLM.from_pretrained(llm_dir, **parts_options(options).kwargs())
    state = read_state_dict(folder / "mm_projector.bin")
    return _compose(folder, config, llm, load_tokenizer(llm_dir, options), state, vision, convert, options, [], [],
                    {"projector": str(folder / "mm_projector.bin"), "llm": str(llm_dir)})


# ---------------------------------------------------------------- transformers 4's own LLaVA folders

def chat_template_saved(folder: Path) -> bool:
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    return any(json.loads((folder / name).read_text()).get("chat_template")
               for name in ("processor_config.json", "tokenizer_config.json") if (folder / name).is_file())


def processor_complete(folder: Path) -> bool:
    """Whether the processor says how many tokens an image takes (transformers >= 4.47 wrote it)."""
    saved = folder / "processor_config.json"
    return saved.is_file() and bool(json.loads(saved.read_text()).get("patch_size"))


def convert_transformers4(folder: Path, options: LoadOptions = LoadOptions(),
                          convert: ConvertOptions = ConvertOptions()):
    """A transformers LLaVA folder written before the processor recorded its image token count, often
    without a chat template (XTuner's `--save-format huggingface`): the weights through the family's
    renames, the processor completed from the model config, the template given or the default."""
    from vlmtune.models.parts import convert_transformers
    from vlmtune.data.templates import BUILTIN
    from vlmtune.models.chat_template import DEFAULT_CHAT_TEMPLATE

    loaded = convert_transformers(folder, options, convert)
    config, processor = loaded.model.config, loaded.processor
    tower = loaded.model.model.vision_tower
    processor.patch_size = config.vision_config.patch_size
    processor.vision_feature_select_strategy = config.vision_feature_select_strategy
    processor.num_additional_image_tokens = 1 if hasattr(tower.embeddings, "class_embedding") else 0
    if not getattr(processor, "chat_template", None):
        processor.chat_template = DEFAULT_CHAT_TEMPLATE
        loaded.notes.append(f"warning: {folder} has no chat template, so vlmtune's default is used; if the model was "
                            f"trained with another format, set data.chat_template (or convert --chat-template) to it "
                            f"({', '.join(BUILTIN)} or a .jinja file)")
    return loaded


def refuse_mgm(folder: Path, *args, **kwargs):
    raise ConversionError(f"{folder}: {MGM_MESSAGE}")


def refuse_next(folder: Path, *args, **kwargs):
    raise ConversionError(f"{folder}: {NEXT_MESSAGE}")
