"""Original Mini-Gemini (dvlab-research/MGM) checkpoints, read in place.

Stage 2 (and later) folders hold `MGM*ForCausalLM` weights: the LLM under `model.layers.*`, the ViT
under `model.vision_tower.vision_tower.vision_model.*` (transformers-4 CLIP names), the ConvNeXt under
`model.vision_tower_aux.vision_stem|vision_stages.*` (timm names, float16 as MGM's trainer casts it),
the mining modules `model.vlm_uni_{query,aux,val}_projector.{0,1}.*` and `model.mm_projector.*`.
A stage-1 folder holds `config.json` and `mm_projector.bin`, which carries the projector, the mining
modules and both towers (MGM's save filter matches `vision_tower` and `vision_stages`); its LLM is the
folder `config.json` names (`_name_or_path`), or the one given.

MGM's own loader needs "mgm" in the folder name, reads `vlm_uni_*` only through a shard index,
re-initialises both towers from `mm_vision_tower[_aux]` and calls the checkpoint's tower weights
"not used". Here every tensor is placed or reported: the towers come from the checkpoint, the
original tower folders only fill what it lacks, and anything left over is an error."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, CLIPVisionConfig

from vlmtune.models.weights import ConversionError, read_state_dict
from vlmtune.models.family import ConvertOptions, LoadOptions
from vlmtune.models.mgm.build import IMAGE_TOKEN
from vlmtune.models.mgm.configuration_mgm import MGMConfig
from vlmtune.models.mgm.modeling_mgm import MGMForConditionalGeneration
from vlmtune.models.mgm.processing_mgm import MGMImageProcessor, MGMProcessor
from vlmtune.models.mgm.towers import convnext_config, load_aux_tower, timm_to_transformers
from vlmtune.models.parts import check_accounting

TEXT_TYPES = {"mgm": "llama", "mgm_gemma": "gemma", "mgm_mistral": "mistral", "mgm_mixtral": "mixtral"}
STAGE1_FILE = "mm_projector.bin"
OPENAI_MEAN, OPENAI_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
VIT = "model.vision_tower.vision_tower.vision_model."
AUX = "model.vision_tower_aux."
MINING = {"query": "query", "aux": "key", "val": "value"}
IGNORED = re.compile(r"(position_ids|rotary_emb\.inv_freq)$")  # buffers older transformers saved


def raw_config(folder: Path) -> dict | None:
    path = folder / "config.json"
    return json.loads(path.read_text()) if folder.is_dir() and path.is_file() else None


def is_original(folder: Path) -> bool:
    raw = raw_config(folder)
    return bool(raw) and "mm_vision_tower_aux" in raw and (
        raw.get("model_type") in TEXT_TYPES or any(a.startswith("MGM") for a in raw.get("architectures") or []))


def is_stage1(folder: Path) -> bool:
    return is_original(folder) and (folder / STAGE1_FILE).is_file()


def is_stage2(folder: Path) -> bool:
    return is_original(folder) and not (folder / STAGE1_FILE).is_file()


def rename(key: str) -> str | None:
    """An original MGM key as vlmtune's MGM names it; None for keys of no component."""
    if key.startswith(VIT):
        return "model.vision_tower." + key[len(VIT):]
    if key.startswith(AUX):
        rest = key[len(AUX):].replace("vision_stem.", "stem.", 1).replace("vision_stages.", "stages.", 1)
        return "model.vision_tower_aux." + next(iter(timm_to_transformers({rest: None})))
    if match := re.match(r"model\.vlm_uni_(query|aux|val)_projector\.([01])\.(.+)$", key):
        return f"model.mining.{MINING[match.group(1)]}.{'norm' if match.group(2) == '0' else 'proj'}.{match.group(3)}"
    if match := re.match(r"model\.mm_projector\.(?:(0|2)\.)?(weight|bias)$", key):
        return f"model.multi_modal_projector.linear_{'2' if match.group(1) == '2' else '1'}.{match.group(2)}"
    if key.startswith("lm_head."):
        return key
    if key.startswith("model.") and not key.startswith(("model.vision_tower", "model.vlm_uni", "model.mm_projector")):
        return "model.language_model." + key[len("model."):]
    return None


def vision_config(state: dict, folder: Path | None) -> tuple[CLIPVisionConfig, str]:
    """The ViT's config: from the original tower folder when it is here, else from the weights (heads
    by CLIP's 64-wide convention)."""
    if folder is not None and (folder / "config.json").is_file():
        config = AutoConfig.from_pretrained(folder)
        return getattr(config, "vision_config", config), f"config from {folder}"
    patch = state["model.vision_tower.embeddings.patch_embedding.weight"]
    positions = state["model.vision_tower.embeddings.position_embedding.weight"].shape[0]
    hidden, size = patch.shape[0], patch.shape[-1]
    layers = 1 + max(int(k.split(".")[4]) for k in state if k.startswith("model.vision_tower.encoder.layers."))
    return CLIPVisionConfig(hidden_size=hidden, num_attention_heads=max(1, hidden // 64), num_hidden_layers=layers,
                            intermediate_size=state["model.vision_tower.encoder.layers.0.mlp.fc1.weight"].shape[0],
                            patch_size=size, image_size=int(round((positions - 1) ** 0.5)) * size), "config inferred from the weights"


def _folder(value) -> Path | None:
    return Path(value) if value and Path(value).is_dir() else None


def load_original(path: Path, options: LoadOptions = LoadOptions(), convert: ConvertOptions | None = None):
    """An original MGM stage-1 or stage-2 folder as a vlmtune MGM model, with a per-component report;
    `convert.llm` / `convert.vision` stand in for the LLM and ViT folders the config names."""
    convert = convert or ConvertOptions()
    llm = convert.llm
    from vlmtune.models.loaded import LoadedModel
    from vlmtune.models.mgm.family import MGM

    raw = raw_config(path)
    stage1 = is_stage1(path)
    source = path / STAGE1_FILE if stage1 else path
    state, unused, origin = {}, [], {}  # origin: vlmtune name -> the checkpoint's, for messages
    for key, tensor in read_state_dict(source).items():
        new = rename(key)
        (unused.append(key) if new is None and not IGNORED.search(key) else None)
        if new is not None and not IGNORED.search(key):
            state[new] = tensor.float() if tensor.is_floating_point() else tensor
            origin[new] = key
    sources, notes = {}, check_accounting(str(source), unused, [], convert)  # raises unless --allow-unused

    llm_dir = llm or (_folder(raw.get("_name_or_path")) if stage1 else path)
    if stage1:
        if llm_dir is None:
            raise ConversionError(f"{path} is an MGM stage-1 folder ({STAGE1_FILE}: projector, mining, towers); its LLM "
                                  f"{raw.get('_name_or_path')!r} is not a folder here: give it with --llm")
        llm_model = AutoModelForCausalLM.from_pretrained(llm_dir, dtype=torch.float32)
        state |= {rename(k): v for k, v in llm_model.state_dict().items()}
        text_config = llm_model.config
        sources["llm"] = f"{llm_dir} (the LLM stage 1 trained on)"
    else:
        text_type = TEXT_TYPES.get(raw.get("model_type"), "llama")
        known = set(AutoConfig.for_model(text_type).to_dict())
        text_config = AutoConfig.for_model(text_type, **{k: v for k, v in raw.items()
                                                         if k in known and k not in ("model_type", "architectures")})
        sources["llm"] = f"{path}: model.layers.* / lm_head"
    tokenizer = AutoTokenizer.from_pretrained(llm_dir)

    vit_dir, aux_dir = convert.vision or _folder(raw.get("mm_vision_tower")), _folder(raw.get("mm_vision_tower_aux"))
    has_vit = any(k.startswith("model.vision_tower.") for k in state)
    has_aux = any(k.startswith("model.vision_tower_aux.") for k in state)
    if not has_vit:
        if vit_dir is None:
            raise ConversionError(f"{path}: no ViT weights in the checkpoint and its mm_vision_tower "
                                  f"{raw.get('mm_vision_tower')!r} is not a folder here; give the CLIP folder with --vision")
        from vlmtune.models.llava.build import load_vision
        state |= {"model.vision_tower." + k: v for k, v in load_vision(str(vit_dir)).state_dict().items()}
        vision, how = vision_config(state, vit_dir)
        sources["vision"] = f"{vit_dir} (mm_vision_tower: not in the checkpoint)"
    else:
        vision, how = vision_config(state, vit_dir)
        sources["vision"] = f"{source}: {VIT}* (transformers-4 CLIP names; {how})"
    if not has_aux:
        if aux_dir is None:
            raise ConversionError(f"{path}: no ConvNeXt weights in the checkpoint and its mm_vision_tower_aux "
                                  f"{raw.get('mm_vision_tower_aux')!r} is not a folder here; put the OpenCLIP folder there")
        state |= {"model.vision_tower_aux." + k: v for k, v in load_aux_tower(aux_dir)[0].state_dict().items()}
        sources["vision_aux"] = f"{aux_dir} (mm_vision_tower_aux: not in the checkpoint)"
    else:
        dtypes = {str(t.dtype).removeprefix("torch.") for k, t in read_state_dict(source).items() if k.startswith(AUX)}
        sources["vision_aux"] = f"{source}: {AUX}vision_stem|vision_stages.* (timm ConvNeXt, {'/'.join(sorted(dtypes))} -> float32)"
    sources["mining"] = f"{source}: model.vlm_uni_{{query,aux,val}}_projector.*"
    sources["projector"] = f"{source}: model.mm_projector.*"

    aux_state = {k[len("model.vision_tower_aux."):]: v for k, v in state.items() if k.startswith("model.vision_tower_aux.")}
    size_aux = int(raw.get("image_size_aux", 320))
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
        notes.append(f"added {IMAGE_TOKEN} to the tokenizer (MGM splices images at id -200, which no tokenizer has)")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    text_config.pad_token_id = tokenizer.pad_token_id
    projector = "linear" if "model.multi_modal_projector.linear_2.weight" not in state else "mlp2x_gelu"
    config = MGMConfig(vision_config=vision, vision_aux_config=convnext_config(aux_state, size_aux), text_config=text_config,
                       image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), projector_type=projector,
                       vision_feature_layer=raw.get("mm_vision_select_layer", -2), image_size_aux=size_aux,
                       image_grid=int(raw.get("image_grid", 1) or 1), image_global=bool(raw.get("image_global", False)),
                       vision_feature_select_strategy="default" if raw.get("mm_vision_select_feature", "patch") == "patch" else "full",
                       tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)))
    model = MGMForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("model.vision_tower_aux.layernorm.")  # MGM drops the head norm
               and not (config.tie_word_embeddings and k == "lm_head.weight")]
    notes += check_accounting(str(path), [origin.get(k, k) for k in unexpected], missing, convert)  # raises unless --allow-unused / --allow-missing
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    model = model.to(getattr(torch, options.dtype)) if options.dtype else model
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(model.generation_config, key, getattr(tokenizer, key))
    mean, std = OPENAI_MEAN, OPENAI_STD
    if vit_dir is not None and (vit_dir / "preprocessor_config.json").is_file():
        pre = json.loads((vit_dir / "preprocessor_config.json").read_text())
        mean, std = pre.get("image_mean", mean), pre.get("image_std", std)
    images = MGMImageProcessor(image_size=vision.image_size, image_mean=mean, image_std=std,
                               image_aspect_ratio=raw.get("image_aspect_ratio", "pad"),
                               image_grid=config.image_grid, image_global=config.image_global,
                               size={"shortest_edge": size_aux}, crop_size={"height": size_aux, "width": size_aux})
    from vlmtune.models.chat_template import DEFAULT_CHAT_TEMPLATE
    processor = MGMProcessor(images, tokenizer, patch_size=vision.patch_size, image_token=IMAGE_TOKEN,
                             chat_template=tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE)
    return LoadedModel(model, processor, MGM, path, "converted", sources=sources, notes=notes)


def describe(path: Path) -> dict:
    """What `vlmtune inspect` shows for an original MGM folder (shapes only: nothing is loaded)."""
    from vlmtune.models.weights import tensor_shapes
    from vlmtune.models.mgm.family import MGM

    raw = raw_config(path) or {}
    stage1 = is_stage1(path)
    files = [path / STAGE1_FILE] if stage1 else sorted(path.glob("*.safetensors")) + sorted(
        f for f in path.glob("*.bin") if f.name != "training_args.bin")
    groups: dict[str, dict] = {}
    for file in files:
        for key, (shape, dtype) in tensor_shapes(file).items():
            new = rename(key)
            group = groups.setdefault((MGM.component_of(new) if new else None) or "other",
                                      {"tensors": 0, "params": 0, "dtypes": set()})
            group["tensors"] += 1
            group["params"] += int(torch.Size(shape).numel())
            group["dtypes"].add(dtype)
    needs = ("mm_vision_tower", "mm_vision_tower_aux") + (("_name_or_path",) if stage1 else ())
    return {"architecture": (raw.get("architectures") or [raw.get("model_type")])[0], "stage": 1 if stage1 else 2,
            "image_size_aux": raw.get("image_size_aux"), "image_grid": raw.get("image_grid", 1),
            "image_global": raw.get("image_global", False),
            "components": {c: {**g, "dtypes": sorted(g["dtypes"])} for c, g in groups.items()},
            "needs_base": {key: {"path": raw.get(key), "present": _folder(raw.get(key)) is not None,
                                 "in_checkpoint": _in_checkpoint(key, groups)}
                           for key in needs},
            "files": sorted(p.name for p in path.iterdir())}


def _in_checkpoint(key: str, groups: dict) -> bool:
    return {"mm_vision_tower": "vision", "mm_vision_tower_aux": "vision_aux", "_name_or_path": "llm"}[key] in groups
