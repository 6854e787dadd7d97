"""The transformers Trainer with what multimodal fine-tuning needs on top, in one named place:

- logits only where a label is (a boolean `logits_to_keep`, which transformers' models slice before
  the LM head): the [batch, seq, vocab] logits of unlabelled prompt and image tokens are never made,
  nor the last MLP's output there (`kept_positions`, `vlmtune.models.labelled`);
- packed rows (`data.packing`, `data.padding_free`): per-sample positions from `pack_lengths` (and the family's own
  multi-row positions), no attention mask, so attention stays inside each sample (computed per
  sample, not over the whole row, where the model runs SDPA: `vlmtune.models.segments`);
- length-grouped batches from lengths known after encoding (the stock sampler would load every
  sample, images included, to measure it);
- with several processes, text-only batches still run the vision path (on a blank image, times zero).
Loss scaling across accumulation steps and processes stays the Trainer's (`compute_loss_func`)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from transformers import Trainer
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME
from transformers.trainer_pt_utils import LengthGroupedSampler

from vlmtune.console import console
from vlmtune.data.encode import IGNORE
from vlmtune.models.family import Family, base_model
from vlmtune.models.positions import packed_inputs
from vlmtune.training.distributed import fsdp_on_cpu
from vlmtune.training.sharded import full_optimizer_state, load_full_optimizer_state


def label_positions(labels: torch.Tensor) -> torch.Tensor:
    """[batch, seq] bool: the positions whose next token is labelled (the only logits a loss uses)."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE
    return keep


def supervised_loss(outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """Next-token cross-entropy over labelled positions, from full logits or from only the kept ones."""
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
    if logits.ndim == 3 and logits.shape[:2] == labels.shape:  # every position (no `logits_to_keep` taken)
        logits, targets = logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()
    else:  # [kept, vocab], in the row-major order of `label_positions`
        logits, targets = logits.reshape(-1, logits.shape[-1]), labels[:, 1:][label_positions(labels)[:, :-1]]
    loss = F.cross_entropy(logits.float(), targets.to(logits.device), ignore_index=IGNORE, reduction="sum")
    if num_items_in_batch is None:
        return loss / (targets != IGNORE).sum().clamp(min=1)
    return loss / num_items_in_batch


def blank_image_inputs(processor) -> dict[str, torch.Tensor]:
    """The image processor's inputs for one blank image (any size: the processor resizes or tiles it)."""
    from PIL import Image

    out = processor.image_processor(images=[Image.new("RGB", (64, 64))], return_tensors="pt")
    return {k: v for k, v in out.items() if torch.is_tensor(v)}


def keep_vision_busy(model, blank: dict[str, torch.Tensor]):
    """With several processes, a batch without images would leave a trainable vision tower out of the
    backward pass on that process only, and DDP / FSDP / ZeRO-3 wait for gradients that never come. So
    such a forward also runs the tower on a blank image and adds its features times zero: every process
    uses every parameter, and the loss and gradients are unchanged.

    The tower runs, and joins the graph, where an image batch's does: right after the input embeddings
    (transformers' VLMs embed the text, then encode the images into it). FSDP gathers each layer's
    shards in forward and backward order, and every process must ask for them in the same order.
    Returns the hook handles."""
    base = base_model(model)
    state: dict = {}

    def zero(device) -> torch.Tensor:
        features = base.get_image_features(**{k: v.to(device) for k, v in blank.items()})
        state["done"] = True
        # transformers' towers return their whole output with the features as `pooler_output`: only the
        # features join an image batch's graph, and a sharding engine reduces exactly the gradients made
        used = getattr(features, "pooler_output", None)
        return sum(t.float().sum() for t in _tensors(features if used is None else used)) * 0.0

    def start(module, args, kwargs):
        state.clear()
        state["text_only"] = not any(kwargs.get(key) is not None for key in blank)

    def embedded(module, args, output):
        if state.get("text_only") and not state.get("done"):
            return output + zero(output.device).to(output.dtype)
        return output

    def end(module, args, kwargs, output):
        if state.get("text_only") and not state.get("done") and getattr(output, "logits", None) is not None:
            output.logits = output.logits + zero(output.logits.device).to(output.logits.dtype)  # inputs_embeds given
        state.clear()
        return output

    return (model.register_forward_pre_hook(start, with_kwargs=True),
            base.get_input_embeddings().register_forward_hook(embedded),
            model.register_forward_hook(end, with_kwargs=True))


def _tensors(value):
    if torch.is_tensor(value):
        yield value
    elif isinstance(value, dict) or hasattr(value, "values"):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def fsdp_units(model) -> str:
    """What FSDP2 sharded, as `2 x LlamaDecoderLayer, Embedding, ...` (from the wrapped model itself)."""
    from collections import Counter

    from torch.distributed.fsdp import FSDPModule

    counts = Counter(type(m).__name__.removeprefix("FSDP") for m in model.modules() if isinstance(m, FSDPModule))
    return f"{sum(counts.values())} units (" + ", ".join(f"{n} x {name}" for name, n in counts.items()) + ")"


def takes_logits_to_keep(model) -> bool:
    base = base_model(model)
    return "logits_to_keep" in inspect.signature(base.forward).parameters


class VlmTrainer(Trainer):
    """The transformers Trainer with vlmtune's loss, batching and optimizer. `param_groups(model)` gives
    the per-component groups (None: the Trainer's own); the optimizer is built from them when the
    Trainer asks (`create_optimizer`), which under FSDP is the only way in: the Trainer refuses a ready
    optimizer there, and accelerate moves the groups onto the sharded parameters when it wraps the model."""

    def __init__(self, *args, family: Family, param_groups: Callable[[nn.Module], list[dict]] | None = None,
                 lengths: list[int] | None = None, **kwargs):
        super().__init__(*args, compute_loss_func=supervised_loss, **kwargs)
        self.param_groups = param_groups
        self.family = family
        self.lengths = lengths  # per training item (sample or packed row), for `data.group_by_length`
        self.slice_logits = takes_logits_to_keep(self.model)
        self.kept_positions = None  # `vlmtune.models.labelled`: the last MLP's positions, set each step
        base = base_model(self.model)
        self.first_step = True
        self.busy = None  # keep_vision_busy's hooks: with several processes, added at the first step
        if self.args.world_size > 1 and hasattr(base, "get_image_features") and self.processing_class is not None:
            self.busy = blank_image_inputs(self.processing_class)

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        if self.args.fsdp and not self.is_fsdp_enabled:  # the CPU: accelerate dropped FSDP (see `fsdp_on_cpu`)
            from accelerate.utils import FullyShardedDataParallelPlugin

            fsdp_on_cpu(self.accelerator, FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args))
            self.is_fsdp_enabled = True

    # under FSDP, checkpoints keep the format of every other run (`vlmtune.training.sharded`)
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self.is_fsdp_enabled:
            return super()._save_optimizer_and_scheduler(output_dir)
        state = full_optimizer_state(self.model, self.optimizer)  # every process takes part
        if self.args.should_save:
            torch.save(state, Path(output_dir) / OPTIMIZER_NAME)
            torch.save(self.lr_scheduler.state_dict(), Path(output_dir) / SCHEDULER_NAME)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if not self.is_fsdp_enabled or checkpoint is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        load = lambda name: torch.load(Path(checkpoint) / name, map_location="cpu", weights_only=True)  # noqa: E731
        load_full_optimizer_state(self.model, self.optimizer, load(OPTIMIZER_NAME), Path(checkpoint))
        self.lr_scheduler.load_state_dict(load(SCHEDULER_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if not self.is_fsdp_enabled:  # under FSDP the run restored the weights before the model was wrapped
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def create_optimizer(self, model=None):
        """The per-component groups in the optimizer `args.optim` names: by default torch's fused AdamW,
        which updates every parameter in one kernel. A plain `torch.optim.AdamW` on CPU tensors loops over
        them one by one (torch uses its multi-tensor path only on accelerators): 41 ms instead of 8 ms a
        step for a 7.6M-parameter LLaVA on 2 cores."""
        if self.param_groups is None:
            return super().create_optimizer(model)
        if self.optimizer is None:
            cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
            self.optimizer = cls(self.param_groups(self.model), **kwargs)
        return self.optimizer

    def _get_train_sampler(self, train_dataset=None):
        if self.lengths is None:
            return super()._get_train_sampler(train_dataset)
        return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                    lengths=self.lengths)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.first_step:  # the model is wrapped now
            self.first_step = False
            if self.is_fsdp_enabled:
                console.print(f"fsdp: {fsdp_units(self.model)} over {self.args.world_size} processes")
            if self.busy is not None:  # after FSDP's hooks, which must run before these
                self.busy = keep_vision_busy(self.model, self.busy)
        inputs = dict(inputs)
        if "pack_lengths" in inputs:
            inputs = packed_inputs(self.accelerator.unwrap_model(model), self.family, inputs)
        if self.slice_logits and "labels" in inputs:
            inputs["logits_to_keep"] = label_positions(inputs["labels"])
        if self.kept_positions is not None:
            self.kept_positions.mask = inputs.get("logits_to_keep")
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
