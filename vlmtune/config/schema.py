"""The run configuration: one typed schema that YAML, CLI overrides and `--help` all come from.

Key names are a public contract (scripts and other tools write them); add keys, never rename.
"""

from __future__ import annotations

import difflib
import typing
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Mode = Literal["frozen", "full", "lora"]
MODES = ("frozen", "full", "lora")
COMPONENTS = ("vision", "projector", "llm")  # the usual three; families may have more (any names)


def refuse_near_typos(extra: dict | None, known: tuple[str, ...], section: str) -> None:
    """Sections that accept any component name still catch a near-miss of a usual one (`vison`)."""
    for key in extra or {}:
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.8)
        if close and key not in known:
            raise ValueError(f"unknown key `{section}.{key}`; did you mean `{section}.{close[0]}`?")


class Section(BaseModel):
    """Base for every section: unknown keys are errors, assignments are validated, and numbers must be
    finite numbers (an infinite learning rate trains a NaN model; `true` is not a learning rate)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value, info):
        annotation = cls.model_fields[info.field_name].annotation
        kinds = set(typing.get_args(annotation) or (annotation,))
        if isinstance(value, bool) and kinds & {int, float} and bool not in kinds:
            raise ValueError("expected a number, got a boolean")
        return value


class ModelConfig(Section):
    path: str | None = Field(None, description="A model folder (full model or vlmtune LoRA output) to fine-tune.")
    vision: str | None = Field(None, description="Vision encoder folder; with `model.llm`, builds a new VLM (stage 1).")
    llm: str | None = Field(None, description="Language model folder (with tokenizer); used with `model.vision`.")
    vision_aux: str | None = Field(
        None, description="With `model.family: mgm`: the high-resolution ConvNeXt folder (transformers ConvNextModel, "
        "OpenCLIP with open_clip_config.json, or timm)."
    )
    image_size_aux: int | None = Field(
        None, gt=0, description="With `model.vision_aux`: the high-resolution image size (default: the tower's own, e.g. 768 for MGM)."
    )
    image_grid: int | None = Field(
        None, ge=1, le=4, description="With `model.vision_aux`: MGM-HD, the ViT sees image_grid x image_grid crops of an "
        "image_grid times larger view (MGM-HD uses 2 with image_size_aux 1536)."
    )
    image_global: bool | None = Field(
        None, description="With `model.image_grid` >= 2: add a whole-image view to the crops (MGM-HD's image_global)."
    )
    family: str | None = Field(
        None, description="With `model.vision` + `model.llm`: the family to build (default: llava). See `vlmtune inspect`."
    )
    projector: Literal["mlp2x_gelu", "linear"] = Field(
        "mlp2x_gelu", description="Projector for a newly built VLM: `mlp2x_gelu` (Linear-GELU-Linear) or `linear`."
    )
    projector_weights: str | None = Field(
        None, description="With `model.vision` + `model.llm`: start the projector from these weights (e.g. stage-1 mm_projector.bin)."
    )
    weights: str | None = Field(
        None, description="A state-dict file (.pth/.bin/.safetensors, transformers or XTuner naming, may be partial) "
        "loaded over the model before training."
    )
    trust_remote_code: bool = Field(False, description="Allow model code from the model folder. Only for folders you trust.")
    components: dict[str, list[str]] | None = Field(
        None, description="For a model whose family vlmtune does not know: component name -> module-path prefixes, "
        "e.g. `{vision: [model.vision_tower], projector: [model.multi_modal_projector], llm: [model.language_model, lm_head]}`."
    )
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="Load the weights in this dtype (default: as saved, upcast to float32 for training on CPU)."
    )
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2", "flex_attention"] | None = Field(
        None, description="Attention kernel passed to transformers (default: its choice; flash_attention_2 needs a GPU)."
    )

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if self.projector_weights and self.path:
            raise ValueError("`model.projector_weights` goes with `model.vision` + `model.llm`; a `model.path` has its projector")
        if (self.vision_aux or self.image_size_aux or self.image_grid or self.image_global) and not (self.vision and self.llm):
            raise ValueError("`model.vision_aux` / `model.image_size_aux` / `model.image_grid` / `model.image_global` build a "
                             "new MGM with `model.vision` + `model.llm`; a `model.path` has its aux tower and views")
        if self.image_global and (self.image_grid or 1) < 2:
            raise ValueError("`model.image_global` adds a whole-image view to MGM-HD's crops: set `model.image_grid: 2` too")
        if self.path and (self.vision or self.llm):
            raise ValueError("give either `model.path` or `model.vision` + `model.llm`, not both")
        if not self.path and not (self.vision and self.llm):
            missing = [k for k in ("vision", "llm") if not getattr(self, k)]
            raise ValueError(
                "no model given: set `model.path` to a model folder, or both `model.vision` and `model.llm` "
                f"to build a new VLM (missing: {', '.join('model.' + k for k in missing)})"
            )
        return self


class DataConfig(Section):
    train: list[str] = Field(..., min_length=1, description="Training data files (JSON or JSON Lines); a string or a list.")
    eval: list[str] = Field(default_factory=list, description="Evaluation data files, evaluated at each save.")
    images_root: str | None = Field(None, description="Folder image paths are relative to (default: each data file's folder).")
    max_length: int = Field(2048, gt=0, description="Maximum tokens per sample, image tokens included.")
    loss_on: Literal["assistant", "last_turn", "all"] = Field(
        "assistant", description="Which tokens are trained: every `assistant` turn, the `last_turn` only, or `all` text."
    )
    chat_template: str | None = Field(
        None, description="Chat template for training and the saved model: a built-in name (default, vicuna_v1, chatml, "
        "llama_2, mistral_instruct) or a .jinja file; default: the model's own."
    )
    skip_bad: bool = Field(False, description="Skip samples that fail the data check (counted) instead of refusing the run.")
    num_workers: int = Field(0, ge=0, le=64, description="Data-loader worker processes (images load lazily in them).")
    max_image_pixels: int = Field(
        4096 * 4096, gt=0, description="Images with more pixels (width x height) are bad samples (see `data.skip_bad`), "
        "or downscaled to fit when `data.downscale_large_images` is true."
    )
    downscale_large_images: bool = Field(
        False, description="Downscale images larger than `data.max_image_pixels` when they load instead of refusing them."
    )
    confine_images: bool = Field(
        False, description="Refuse any image outside `data.images_root` (or each data file's folder): "
        "no `../`, absolute paths or symlinks leading out."
    )
    packing: bool = Field(
        False, description="Pack several samples into each row of up to data.max_length tokens: per-sample positions, attention that "
        "never crosses samples, images kept with their samples. Same loss as unpacked batches, fewer wasted tokens."
    )
    padding_free: bool = Field(
        False, description="Join each batch's `train.batch_size` samples end to end in one row instead of padding "
        "them: the same batches, steps and loss as unpacked training (`data.packing` fills rows of data.max_length "
        "tokens instead, so a step holds more samples), without computing the padding; attention per sample."
    )
    image_cache_mb: int = Field(
        1024, ge=0, description="Keep each sample's processed image inputs in memory, up to this many MiB (per "
        "data-loader process), so later epochs decode and preprocess no image again; 0 turns it off."
    )
    group_by_length: bool = Field(
        False, description="Batch samples of similar encoded length together (lengths known after encoding; "
        "no image is decoded to measure one), so less of each batch is padding."
    )

    @field_validator("train", "eval", mode="before")
    @classmethod
    def _as_list(cls, value):
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one_way_to_join(self) -> DataConfig:
        if self.packing and self.padding_free:
            raise ValueError("`data.packing` and `data.padding_free` both join samples into rows: choose one "
                             "(padding_free keeps train.batch_size samples a step; packing fills rows of data.max_length tokens)")
        return self


class LoraSettings(Section):
    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: float = Field(32, gt=0, description="LoRA alpha (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout.")
    targets: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Per component, the names of the linear layers to adapt (e.g. `{llm: [q_proj, v_proj]}`); "
        "default: every linear layer of the component.",
    )


class QuantSettings(Section):
    """QLoRA: the base weights of these components load quantized by bitsandbytes and stay frozen;
    LoRA adapters train on top in `compute_dtype`."""

    type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type (with `tune.quantize=4bit`).")
    double_quant: bool = Field(True, description="Also quantize the quantization constants (4-bit).")
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Dtype of the matmuls on quantized weights (`auto`: bfloat16 on a GPU that has it, else float32)."
    )
    components: list[str] = Field(
        default_factory=lambda: ["llm"],
        description="Components loaded quantized (default: the LLM; vision tower and projector stay in full precision).",
    )


class ComponentRates(Section):
    """Per-component learning rates; components beyond the usual three are allowed (checked against the family)."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)
    vision: float | None = Field(None, gt=0, description="Learning rate of the vision encoder (default `train.lr`).")
    projector: float | None = Field(None, gt=0, description="Learning rate of the projector (default `train.lr`).")
    llm: float | None = Field(None, gt=0, description="Learning rate of the language model (default `train.lr`).")

    @model_validator(mode="after")
    def _extra_rates(self) -> ComponentRates:
        refuse_near_typos(self.model_extra, COMPONENTS, "tune.lr")
        for key, value in (self.model_extra or {}).items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ValueError(f"`tune.lr.{key}` must be a positive number (got {value!r})")
        return self


class TuneConfig(Section):
    """Per component `frozen` / `full` / `lora`. Keys beyond vision / projector / llm name a family's other
    components (e.g. `vision_aux`, `mining`, `resampler`) and are checked against the model's family."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)
    vision: Mode = Field("frozen", description="Vision encoder: `frozen`, `full` or `lora`.")
    projector: Mode = Field("full", description="Projector: `frozen`, `full` or `lora`.")
    llm: Mode = Field("full", description="Language model: `frozen`, `full` or `lora`.")
    lora: LoraSettings = Field(default_factory=LoraSettings)
    lr: ComponentRates = Field(default_factory=ComponentRates)
    blocks: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Per component, train only these blocks (module paths inside the component; `layers[1/2:]` is the "
        "last half of a layer list, `stages[:].layers[-1]` the last layer of each stage), e.g. MGM's "
        "`{vision: ['encoder.layers[1/2:]'], vision_aux: ['encoder.stages[:].layers[-1]']}`.",
    )
    quantize: Literal["4bit", "8bit"] | None = Field(
        None, description="QLoRA: load `tune.quant.components` quantized (bitsandbytes) under their LoRA adapters."
    )
    quant: QuantSettings = Field(default_factory=QuantSettings)

    @model_validator(mode="after")
    def _extra_modes(self) -> TuneConfig:
        refuse_near_typos(self.model_extra, COMPONENTS + ("lora", "lr", "blocks"), "tune")
        for key, value in (self.model_extra or {}).items():
            if value not in MODES:
                raise ValueError(f"`tune.{key}` must be one of {', '.join(MODES)} (got {value!r})")
        return self

    @model_validator(mode="after")
    def _something_trains(self) -> TuneConfig:
        if all(mode == "frozen" for mode in self.modes().values()):
            raise ValueError("every component is frozen: set at least one of `tune.vision`, `tune.projector`, `tune.llm` to `full` or `lora`")
        return self

    @model_validator(mode="after")
    def _quantized_are_not_full(self) -> TuneConfig:
        if self.quantize:
            full = [c for c in self.quant.components if self.mode(c) == "full"]
            if full:
                raise ValueError(f"`tune.quantize`: a quantized component cannot be fully trained ({', '.join(full)}); "
                                 f"set {', '.join(f'tune.{c}=lora' for c in full)} (QLoRA) or drop tune.quantize")
        return self

    def modes(self) -> dict[str, str]:
        """Every component named in the section (the usual three and any others)."""
        return {**{c: getattr(self, c) for c in COMPONENTS}, **(self.model_extra or {})}

    def mode(self, component: str) -> str:
        return self.modes().get(component, "frozen")


class DistributedConfig(Section):
    """How several processes share the work; the engines are torch's (DDP, FSDP2) and DeepSpeed's, driven by
    the transformers Trainer. One process ignores this section."""

    strategy: Literal["ddp", "fsdp", "deepspeed"] = Field(
        "ddp", description="`ddp`: every process holds the whole model; `fsdp`: FSDP2 shards parameters, gradients and "
        "optimizer states (the LLM layer by layer); `deepspeed`: ZeRO stage `train.distributed.zero_stage` (needs a CUDA GPU)."
    )
    zero_stage: Literal[2, 3] = Field(2, description="DeepSpeed ZeRO stage: 2 shards gradients and optimizer states, 3 also parameters.")
    offload_optimizer: bool = Field(False, description="DeepSpeed: keep optimizer states in CPU memory.")
    offload_params: bool = Field(False, description="DeepSpeed ZeRO-3: keep parameters in CPU memory; fsdp: keep "
                                 "parameters, gradients and optimizer states in CPU memory (GPUs only).")
    deepspeed_config: str | None = Field(
        None, description="A DeepSpeed JSON config to pass through instead of the one vlmtune writes from this section."
    )
    backend: Literal["auto", "nccl", "gloo"] = Field("auto", description="Process-group backend: `auto` = nccl on GPUs, gloo on CPU.")


class TrainConfig(Section):
    epochs: float = Field(1.0, gt=0, description="Passes over the training data (ignored when `train.max_steps` is set).")
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps to run; overrides `train.epochs`.")
    batch_size: int = Field(8, gt=0, description="Samples per device per step.")
    grad_accum: int = Field(1, gt=0, description="Gradient accumulation steps.")
    lr: float = Field(2e-5, gt=0, description="Learning rate for components without their own `tune.lr.<component>`.")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate schedule after warmup."
    )
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Fraction of steps spent warming up the learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (not applied to biases and norms).")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm (0 disables).")
    seed: int = Field(42, ge=0, le=2**32 - 1, description="Seed for initialisation, data order and dropout (0 to 2**32-1).")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="`auto` = bf16 on a GPU that supports it, else fp32. fp16 needs a CUDA GPU."
    )
    gradient_checkpointing: bool | list[str] = Field(
        False, description="Recompute activations in the backward pass to save memory: true for every component, or "
        "a list of components (e.g. [llm]) for only those."
    )
    logging_steps: int = Field(10, gt=0, description="Log loss and learning rate every N steps.")
    save_steps: int = Field(500, ge=0, description="Write `checkpoint-<step>` every N steps (0: only the final model).")
    save_total_limit: int | None = Field(None, gt=0, description="Keep at most N checkpoints (oldest deleted first).")
    eval_steps: int | None = Field(None, gt=0, description="Evaluate on `data.eval` every N steps (default: `train.save_steps`).")
    tensorboard: bool = Field(False, description="Also write TensorBoard logs to `<output.dir>/runs`.")
    resume: str | None = Field(
        None, description="`auto`: continue from the newest complete checkpoint in `output.dir`; or a checkpoint folder."
    )
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)

    def recomputes(self, component: str) -> bool:
        """Whether `gradient_checkpointing` covers this component."""
        g = self.gradient_checkpointing
        return g if isinstance(g, bool) else component in g


class OutputConfig(Section):
    dir: str = Field(..., description="Folder for checkpoints, logs and the final model.")
    overwrite: bool = Field(False, description="Allow writing into a non-empty `output.dir`.")
    save: Literal["full", "delta"] = Field(
        "full", description="`delta`: the final folder holds only the tuned components' weights plus a reference to the base."
    )
    merge: bool = Field(False, description="After a LoRA run, also write the merged full model to `<output.dir>/merged`.")


class RunConfig(Section):
    """A whole `vlmtune train` run."""

    model: ModelConfig
    data: DataConfig
    tune: TuneConfig = Field(default_factory=TuneConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    output: OutputConfig

    @model_validator(mode="after")
    def _quantized_outputs(self) -> RunConfig:
        if self.tune.quantize and self.output.merge:
            raise ValueError("`output.merge` with `tune.quantize`: merging LoRA into quantized weights would round them "
                             "again; merge afterwards onto the unquantized base: vlmtune merge --base BASE --llm-adapter OUT")
        if self.tune.quantize and self.output.save == "delta":
            raise ValueError("`output.save=delta` with `tune.quantize`: a QLoRA run saves a LoRA adapter; use output.save=full")
        if self.tune.quantize and not self.model.path:
            raise ValueError("`tune.quantize` needs `model.path` (a full model folder); build the VLM first (stage 1)")
        return self
