"""`vlmtune plan`: peak memory per device of a training run, from the config files alone.

The model is built on the meta device (shapes, no weights) and the run's own tuning plan is applied
to it, so parameter counts per component — trainable ones and LoRA's included — are exact. Bytes:
weights in their load dtype (4/8-bit for quantized components), gradients and AdamW's two states
for trainable parameters, divided over processes as the strategy shards them, and activations from
the sequence length, batch, image tokens and gradient checkpointing (a transformer layer keeps about
6h + 2kv + 4f values per token with SDPA; with checkpointing only its input). Estimates, not
measurements: docs/memory.md compares them with measured peaks."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from transformers import AutoConfig, AutoModelForImageTextToText

from vlmtune.config import ConfigError, RunConfig
from vlmtune.models.labelled import last_mlp
from vlmtune.models.registry import family_for
from vlmtune.tuning.plan import TuningPlan

GIB = 1024 ** 3
UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1024 ** 2, "mb": 1024 ** 2, "mib": 1024 ** 2,
         "g": GIB, "gb": GIB, "gib": GIB, "t": 1024 ** 4, "tb": 1024 ** 4, "tib": 1024 ** 4}


def parse_size(text: str) -> int:
    """`24GiB`, `80 GB`, `16g` -> bytes (binary units, as GPUs report memory)."""
    found = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not found or found[2].lower() not in UNITS or float(found[1]) <= 0:
        raise ConfigError(f"--gpu-mem {text!r}: expected a size such as 24GiB, 80GB or 40g")
    return int(float(found[1]) * UNITS[found[2].lower()])


@dataclass
class Row:
    component: str
    mode: str
    params: int
    trainable: int
    weights: float  # bytes per device, like every figure below
    grads: float
    optimizer: float
    activations: float = 0.0

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations


@dataclass
class Estimate:
    rows: list[Row]
    extra: dict[str, float] = field(default_factory=dict)  # logits, DDP buckets, ZeRO-3 working set
    offloaded: float = 0.0  # bytes kept in CPU memory instead

    @property
    def total(self) -> float:
        return sum(r.total for r in self.rows) + sum(self.extra.values())


def meta_model(cfg: RunConfig):
    """The model the config trains, on the meta device: (model, family). Needs `model.path`."""
    if not cfg.model.path:
        raise ConfigError("`vlmtune plan` reads the model from `model.path` (a model folder); for a new VLM built "
                          "from `model.vision` + `model.llm`, build it once (stage 1) and plan the next stage")
    config = AutoConfig.from_pretrained(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    family = family_for(config, where=cfg.model.path)
    with torch.device("meta"):
        model = (family.model_class or AutoModelForImageTextToText)._from_config(config, dtype=torch.float32)
    return model, family, config


def dtype_bytes(cfg: RunConfig, config) -> int:
    if cfg.model.dtype:
        return torch.empty(0, dtype=getattr(torch, cfg.model.dtype)).element_size()
    saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
    return torch.empty(0, dtype=getattr(torch, str(saved).removeprefix("torch."))).element_size()


def layer_activations(config, tokens: int, element: int, checkpointing: bool, skipped: int = 0,
                      last_mlp_share: float = 1.0) -> float:
    """Bytes a stack of transformer layers keeps for the backward pass, for `tokens` tokens (`skipped`:
    layers training does not run, `Family.unused_layers`; `last_mlp_share`: the share of the tokens the last
    layer's MLP runs at, `vlmtune.models.labelled`)."""
    h = getattr(config, "hidden_size", 0) or getattr(config, "embed_dim", 0)
    layers = (getattr(config, "num_hidden_layers", 0) or getattr(config, "depth", 0)) - skipped
    if not h or not layers:
        return 0.0
    f = getattr(config, "intermediate_size", None) or 4 * h
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "num_heads", 1)
    kv = h // heads * (getattr(config, "num_key_value_heads", None) or heads)
    per_layer = tokens * (6 * h + 2 * kv + 4 * f) * element
    if checkpointing:
        return layers * tokens * h * element + per_layer  # each layer's input, and one layer recomputed
    return layers * per_layer - tokens * (1 - last_mlp_share) * 4 * f * element


def estimate(cfg: RunConfig, nproc: int = 1, labelled: float = 0.5, model=None) -> Estimate:
    """Peak bytes per device for `cfg` run on `nproc` processes (`labelled`: share of tokens with a label)."""
    if model is None:
        model, family, config = meta_model(cfg)
    else:
        family, config = family_for(model.config), model.config
    plan = TuningPlan(cfg.tune, family, cfg.train.lr)
    model = plan.apply(model)
    d = cfg.train.distributed
    shard = nproc if nproc > 1 and (d.strategy == "fsdp" or d.strategy == "deepspeed") else 1
    zero3 = nproc > 1 and (d.strategy == "fsdp" or (d.strategy == "deepspeed" and d.zero_stage == 3))
    deepspeed = nproc > 1 and d.strategy == "deepspeed"
    mixed = cfg.train.precision in ("bf16", "fp16") or (cfg.train.precision == "auto" and torch.cuda.is_available())
    base = dtype_bytes(cfg, config)
    element = 2 if mixed else 4
    quantized = set(cfg.tune.quant.components) if cfg.tune.quantize else set()
    bits = 4 if cfg.tune.quantize == "4bit" else 8

    rows, offloaded = [], 0.0
    for row in plan.rows(model):
        params, trainable = row.total, row.trainable
        frozen_params = params - trainable
        if row.name in quantized:
            frozen_bytes = frozen_params * bits / 8 * 1.03  # + block scales (double quantization keeps them small)
        else:
            frozen_bytes = frozen_params * base
        train_bytes = trainable * (4 if mixed and deepspeed else base)  # ZeRO keeps fp32 masters of trained weights
        weights = (frozen_bytes + train_bytes) / (nproc if zero3 else 1)
        grad_bytes = 4 if base == 4 or deepspeed else base
        grads = trainable * grad_bytes / shard
        optimizer = trainable * 2 * 4 / shard if (mixed or base == 4) else trainable * 2 * base / shard
        if deepspeed and d.offload_optimizer:  # ZeRO-Offload: fp32 gradients and the Adam step live on the CPU
            offloaded += optimizer + grads
            optimizer = grads = 0.0
        if deepspeed and d.offload_params and zero3:
            offloaded += weights
            weights = 0.0
        rows.append(Row(row.name, row.mode, params, trainable, weights, grads, optimizer))

    batch, seq = cfg.train.batch_size, cfg.data.max_length
    trains = {r.component for r in rows if r.trainable}
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    by_name = {r.component: r for r in rows}
    if trains and "llm" in by_name:  # everything upstream trains through the LLM, so it keeps its activations
        by_name["llm"].activations = layer_activations(text_config, batch * seq, element, cfg.train.recomputes("llm"),
                                                       last_mlp_share=labelled if last_mlp(model) else 1.0)
    vision_config = getattr(config, "vision_config", None)
    size = getattr(vision_config, "image_size", 0) if vision_config is not None else 0
    vision_tokens = batch * (size // max(getattr(vision_config, "patch_size", 1), 1)) ** 2 if size else 0
    if "vision" in trains and "vision" in by_name:  # one image per sample
        skipped = len(family.layers_not_run(model))
        by_name["vision"].activations = layer_activations(vision_config, vision_tokens, element,
                                                          cfg.train.recomputes("vision"), skipped)
    tokens = {"llm": batch * seq, "vision": vision_tokens if "vision" in trains else 0}
    layers = {"llm": getattr(text_config, "num_hidden_layers", 1) or 1,
              "vision": getattr(vision_config, "num_hidden_layers", 1) or 1}
    for name, size in lora_dropout_inputs(model, plan, cfg).items():  # each LoRA layer keeps its dropped-out input
        if name in by_name:  # (+ the bool mask); with checkpointing, only the layer being recomputed does
            kept = size / layers.get(name, 1) if cfg.train.recomputes(name) else size
            by_name[name].activations += tokens.get(name, 0) * kept * (element + 1)
    extra = {}
    vocab = getattr(text_config, "vocab_size", 0)
    if trains and vocab:  # fp32 logits, the log-softmax the loss keeps, and their gradient
        extra["logits (labelled positions)"] = batch * seq * labelled * vocab * 4 * 3
    # the optimizer step (torch's fused AdamW, the Trainer's default and vlmtune's: `VlmTrainer.create_optimizer`)
    # updates every tensor in place, with no per-parameter temporaries beside the states counted above
    if nproc > 1 and d.strategy == "ddp":
        extra["DDP gradient buckets"] = sum(r.grads for r in rows)
    if zero3:
        largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)
        extra["ZeRO-3 / FSDP gathered layer"] = 2 * largest * base
    if zero3 and d.strategy == "fsdp":  # vlmtune's root unit (all but the LLM) stays whole through a step
        extra["FSDP root unit (all but the LLM)"] = sum(r.params for r in rows if r.component != "llm") * base * (1 - 1 / nproc)
    return Estimate(rows, extra, offloaded)


def lora_dropout_inputs(model, plan: TuningPlan, cfg: RunConfig) -> dict[str, int]:
    """Per component, the summed input width of its LoRA layers (0 without LoRA dropout)."""
    if not cfg.tune.lora.dropout:
        return {}
    widths: dict[str, int] = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and hasattr(module, "in_features"):
            component = plan.component_of(name)
            if component:
                widths[component] = widths.get(component, 0) + module.in_features
    return widths


def suggestions(cfg: RunConfig, nproc: int, budget: float, labelled: float = 0.5) -> list[tuple[str, float]]:
    """Cheap changes, each alone, with their predicted peak; those that fit first, cheapest first."""
    changes: list[tuple[str, dict]] = []
    if cfg.train.gradient_checkpointing is not True:
        changes.append(("train.gradient_checkpointing=true", {"train.gradient_checkpointing": True}))
    if cfg.train.batch_size > 1:
        half = cfg.train.batch_size // 2
        changes.append((f"train.batch_size={half} train.grad_accum={cfg.train.grad_accum * 2}",
                        {"train.batch_size": half, "train.grad_accum": cfg.train.grad_accum * 2}))
    if cfg.tune.mode("llm") == "full":
        changes.append(("tune.llm=lora", {"tune.llm": "lora"}))
    if cfg.tune.mode("llm") == "lora" and not cfg.tune.quantize:
        changes.append(("tune.quantize=4bit (QLoRA)", {"tune.quantize": "4bit"}))
    if nproc > 1 and cfg.train.distributed.strategy == "ddp":
        changes.append(("train.distributed.strategy=deepspeed (ZeRO-2)", {"train.distributed.strategy": "deepspeed"}))
        changes.append(("train.distributed.strategy=deepspeed zero_stage=3",
                        {"train.distributed.strategy": "deepspeed", "train.distributed.zero_stage": 3}))
    if nproc > 1 and cfg.train.distributed.strategy == "deepspeed" and not cfg.train.distributed.offload_optimizer:
        changes.append(("train.distributed.offload_optimizer=true", {"train.distributed.offload_optimizer": True}))
    out = []
    for text, updates in changes:
        tree = cfg.model_dump()
        for key, value in updates.items():
            section, *rest = key.split(".")
            node = tree[section]
            for part in rest[:-1]:
                node = node[part]
            node[rest[-1]] = value
        try:
            changed = RunConfig.model_validate(tree)
        except ValueError:
            continue
        out.append((text, estimate(changed, nproc, labelled).total))
    return sorted(out, key=lambda item: (item[1] > budget, item[1]))
