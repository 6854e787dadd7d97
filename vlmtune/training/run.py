"""`vlmtune train`: set up (model, data, plan), train on the transformers Trainer, save a complete folder."""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments, set_seed
from transformers.utils import logging as hf_logging

from vlmtune.checkpoints.load import LoadedModel, load_model
from vlmtune.checkpoints.save import save_model_folder
from vlmtune.config import ConfigError, RunConfig
from vlmtune.console import console, plan_table
from vlmtune.data.check import DataReport, check_data, encode_checked
from vlmtune.data.dataset import Collator, ConversationDataset
from vlmtune.data.encode import SampleEncoder
from vlmtune.data.records import DataError
from vlmtune.models.registry import family_named
from vlmtune.training.logs import LOG_FILE, PLOT_FILE, JsonlLogger, plot_loss, read_log
from vlmtune.tuning.plan import TuningPlan

BASE_DIR = "base"  # where a LoRA run keeps a base model that exists nowhere else on disk


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    final_loss: float | None
    first_loss: float | None
    train_seconds: float
    dropped: int


def resolve_precision(precision: str) -> str:
    """`auto` -> bf16 on a capable GPU, else fp32; refuses what this machine cannot run."""
    cuda = torch.cuda.is_available()
    if precision == "auto":
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and not cuda:
        raise ConfigError("`train.precision`: fp16 needs a CUDA GPU and none was found; use bf16 or fp32")
    return precision


def check_output_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(
            f"`output.dir`: {out} already exists and is not empty; choose a new folder or set output.overwrite=true"
        )


def prepare_data(files: list[str], cfg: RunConfig, encoder: SampleEncoder, role: str) -> DataReport:
    """Check and encode one split; refuse bad samples unless `data.skip_bad` (then count them)."""
    report = encode_checked(check_data(files, cfg.data.images_root), encoder)
    if report.problems and not cfg.data.skip_bad:
        raise DataError(
            report.problems,
            f"{role} data: {len(report.problems)} problem(s); fix them (see `vlmtune data check`) "
            "or set data.skip_bad=true to skip those samples",
        )
    for line in report.summary():
        console.print(f"[{role}] {line}")
    if report.problems:
        console.print(f"[{role}] [yellow]skipped {len(report.problems)} bad sample(s) (data.skip_bad=true):[/]")
        for problem in report.problems[:10]:
            console.print(f"  - {problem}")
    if not report.encoded:
        raise DataError(report.problems, f"{role} data: no usable samples")
    return report


def load_or_build(cfg: RunConfig) -> LoadedModel:
    if cfg.model.path:
        return load_model(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    family = family_named("llava")
    model, processor = family.build(cfg.model.vision, cfg.model.llm, cfg.model.projector, cfg.model.trust_remote_code)
    sources = {"vision": cfg.model.vision, "llm": cfg.model.llm, "projector": f"new ({cfg.model.projector})"}
    return LoadedModel(model, processor, family, Path(cfg.model.vision), "built", sources=sources)


def ensure_base_on_disk(loaded: LoadedModel, out: Path) -> Path:
    """An adapter needs a base folder: a plain full model is its own; anything else is saved once."""
    if loaded.kind == "full":
        return loaded.path.resolve()
    base = out / BASE_DIR
    save_model_folder(loaded.model, loaded.processor, base, {"role": "base model of the adapter in ..", "sources": loaded.sources})
    loaded.model.name_or_path = str(base.resolve())
    loaded.model.config._name_or_path = str(base.resolve())
    return base.resolve()


def training_arguments(cfg: RunConfig, out: Path, precision: str, has_eval: bool) -> TrainingArguments:
    t = cfg.train
    eval_steps = t.eval_steps or (t.save_steps or None)
    return TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        learning_rate=t.lr,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        seed=t.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        gradient_checkpointing=t.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        logging_steps=t.logging_steps,
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500,
        save_total_limit=t.save_total_limit,
        eval_strategy="steps" if has_eval and eval_steps else "no",
        eval_steps=eval_steps,
        report_to=["tensorboard"] if t.tensorboard else "none",
        remove_unused_columns=False,
        dataloader_num_workers=cfg.data.num_workers,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=False,
    )


def train(cfg: RunConfig, resume: str | None = None) -> TrainResult:
    """Run one training job described by `cfg`; returns where the model went and how the loss moved."""
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    out = Path(cfg.output.dir)
    if resume is None:
        check_output_dir(out, cfg.output.overwrite)
    precision = resolve_precision(cfg.train.precision)
    if cfg.train.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("`train.tensorboard`: the tensorboard package is not installed; pip install 'vlmtune[tensorboard]'")
    for files, role in ((cfg.data.train, "train"), (cfg.data.eval, "eval")):
        early = check_data(files, cfg.data.images_root)  # no model needed: fail fast on broken data
        if early.problems and not cfg.data.skip_bad:
            raise DataError(early.problems, f"{role} data: {len(early.problems)} problem(s); fix them or set data.skip_bad=true")

    set_seed(cfg.train.seed)
    loaded = load_or_build(cfg)
    console.print(f"model: {loaded.family.name} from " + ", ".join(f"{c}: {s}" for c, s in loaded.sources.items()))
    encoder = SampleEncoder(loaded.processor, loaded.family, cfg.data.max_length, cfg.data.loss_on)
    train_data = prepare_data(cfg.data.train, cfg, encoder, "train")
    eval_data = prepare_data(cfg.data.eval, cfg, encoder, "eval") if cfg.data.eval else None

    out.mkdir(parents=True, exist_ok=True)
    plan = TuningPlan(cfg.tune, loaded.family, cfg.train.lr)
    base_path = ensure_base_on_disk(loaded, out) if plan.uses_lora else None
    model = plan.apply(loaded.model)
    console.print(plan_table(plan.rows(model)))

    optimizer = torch.optim.AdamW(plan.param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr)
    dataset = ConversationDataset(train_data.encoded, loaded.processor, loaded.family)
    eval_dataset = ConversationDataset(eval_data.encoded, loaded.processor, loaded.family) if eval_data else None
    trainer = Trainer(
        model=model,
        args=training_arguments(cfg, out, precision, eval_dataset is not None),
        data_collator=Collator(loaded.processor.tokenizer.pad_token_id),
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        processing_class=loaded.processor,
        callbacks=[JsonlLogger(out / LOG_FILE)],
        optimizers=(optimizer, None),
    )
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - started
    if eval_dataset is not None:
        trainer.evaluate()

    losses = [r["loss"] for r in read_log(out / LOG_FILE) if "loss" in r]
    manifest = {
        "family": loaded.family.name,
        "base": {"path": str(base_path or loaded.path.resolve()), "sources": loaded.sources},
        "plan": plan.describe(),
        "state": {"step": trainer.state.global_step, "epoch": trainer.state.epoch, "last_loss": losses[-1] if losses else None},
        "data": {"train": cfg.data.train, "eval": cfg.data.eval, "train_samples": len(train_data.encoded),
                 "skipped": len(train_data.problems), "truncated": train_data.truncated},
        "config": cfg.model_dump(),
    }
    save_model_folder(model, loaded.processor, out, manifest)
    plot_loss(out / LOG_FILE, out / PLOT_FILE)
    console.print(f"[green]saved[/] {out} ({'LoRA adapter on ' + str(base_path) if base_path else 'full model'}); "
                  f"{trainer.state.global_step} steps in {seconds:.1f}s; loss {losses[0] if losses else float('nan'):.4f} -> "
                  f"{losses[-1] if losses else float('nan'):.4f}")
    return TrainResult(out, trainer.state.global_step, losses[-1] if losses else None, losses[0] if losses else None,
                       seconds, len(train_data.problems))
