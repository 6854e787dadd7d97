"""`vlmtune train`: set up (model, data, plan), train on the transformers Trainer, save a complete folder."""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import TrainingArguments, set_seed
from transformers.trainer_callback import ProgressCallback
from transformers.utils import logging as hf_logging

from vlmtune.models.loaded import LoadedModel
from vlmtune.checkpoints.manifest import MANIFEST, ManifestError, data_fingerprint, model_fingerprint, read_manifest
from vlmtune.checkpoints.save import (
    DELTA_WEIGHTS,
    STAGING,
    disk_full_error,
    is_disk_full,
    model_bytes,
    remove_tree,
    save_model_folder,
)
from vlmtune.checkpoints.load import load_model
from vlmtune.checkpoints.verify import verify
from vlmtune.config import ConfigError, RunConfig
from vlmtune.config.paths import check_paths
from vlmtune.convert.layouts import load_any
from vlmtune.convert.merge import assemble
from vlmtune.models.parts import Parts, apply_state_dict
from vlmtune.console import console, plan_table
from vlmtune.data.check import SKIPPED_FILE, DataReport, check_data, encode_checked, write_problems
from vlmtune.data.dataset import ConversationDataset, collator_for
from vlmtune.data.encode import SampleEncoder
from vlmtune.data.packing import PackedDataset, PackedRows, pack_groups
from vlmtune.data.records import DataError, Problem
from vlmtune.data.shared import read_reports, shared_file, write_reports
from vlmtune.models.family import LoadOptions
from vlmtune.models.segments import switch_to_segments
from vlmtune.models.registry import builder, families
from vlmtune.training.checkpointing import (
    LOCK,
    CompleteCheckpoints,
    clean_staging,
    complete_checkpoints,
    hold_output_dir,
    latest_checkpoint,
    restore_full_weights,
    resume_point,
    run_differences,
)
from vlmtune.training.distributed import (
    Processes,
    backend,
    barrier,
    check_strategy,
    deepspeed_config,
    fsdp_config,
    fsdp_layer_classes,
)
from vlmtune.training.housekeeping import collector_frozen, release_training_state, trained_as_training_runs
from vlmtune.training.recompute import recompute
from vlmtune.training.sharded import restore_adapter_weights
from vlmtune.training.logs import LOG_FILE, PLOT_FILE, JsonlLogger, StepLines, plot_loss, read_log, truncate_log
from vlmtune.training.trainer import VlmTrainer
from vlmtune.tuning.plan import TuningPlan

BASE_DIR = "base"  # where a LoRA or delta run keeps a base model that exists nowhere else on disk
MERGED_DIR = "merged"  # `output.merge`: the LoRA run's merged full model


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    final_loss: float | None
    first_loss: float | None
    train_seconds: float
    dropped: int


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training, after clean-up (no `.partial/`, `loss.png` written): where the run stopped."""

    def __init__(self, step: int, max_steps: int, checkpoint: Path | None):
        super().__init__(step)
        self.step, self.max_steps, self.checkpoint = step, max_steps, checkpoint


def resolve_precision(precision: str) -> str:
    """`auto` -> bf16 on a capable GPU, else fp32; refuses what this machine cannot run."""
    cuda = torch.cuda.is_available()
    if precision == "auto":
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and not cuda:
        raise ConfigError("`train.precision`: fp16 needs a CUDA GPU and none was found; use bf16 or fp32")
    return precision


RUN_ENTRIES = {LOG_FILE, PLOT_FILE, "runs", BASE_DIR, MERGED_DIR, STAGING, MANIFEST, SKIPPED_FILE}
MODEL_FILES = ("*.safetensors", "*.json", "*.jinja", "*.bin", "*.model", "*.tiktoken", "merges.txt", "vocab.txt", "README.md")


def check_output_dir(out: Path, cfg: RunConfig) -> list[Path]:
    """What `output.overwrite` will remove before training: an earlier run's files. Refuses a non-empty
    folder without it (naming the command that continues the earlier run), anything that is not an
    earlier run's file, and a folder that holds the run's own model or data."""
    entries = sorted(p for p in out.iterdir() if p.name != LOCK) if out.is_dir() else []
    if not entries:
        return []
    checkpoints = [p.name for p in complete_checkpoints(out)]
    names = {p.name for p in entries}
    is_run = bool(checkpoints or names & {LOG_FILE, MANIFEST, STAGING} or any(n.startswith("checkpoint-") for n in names))
    if not cfg.output.overwrite:
        if checkpoints:
            raise ConfigError(f"`output.dir`: {out} holds an earlier run (newest {checkpoints[-1]}); continue it with "
                              "`vlmtune train CONFIG --resume`, or set output.overwrite=true to replace it")
        if is_run and MANIFEST not in names:
            raise ConfigError(f"`output.dir`: {out} holds what an interrupted run left (no complete checkpoint); "
                              "start it again with `vlmtune train CONFIG output.overwrite=true`")
        raise ConfigError(f"`output.dir`: {out} already exists and is not empty; choose a new folder or set "
                          "output.overwrite=true (it replaces an earlier run's files)")
    try:
        listed = {Path(n).parts[0] for n in (read_manifest(out) or {}).get("files", {})}
    except ManifestError:
        listed = set()
    foreign = [p.name for p in entries if not (
        p.name in RUN_ENTRIES or p.name in listed or p.name.startswith("checkpoint-")
        or (is_run and p.is_file() and any(p.match(pattern) for pattern in MODEL_FILES)))]
    if foreign:
        raise ConfigError(f"`output.overwrite`: {out} holds {', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}, "
                          "which no vlmtune run wrote; move it away or choose another output.dir")
    m, d = cfg.model, cfg.data
    inputs = [m.path, m.vision, m.llm, m.projector_weights, m.weights, d.images_root, *d.train, *d.eval]
    inside = [p for p in inputs if p and Path(p).resolve().is_relative_to(out.resolve())]
    if inside:
        raise ConfigError(f"`output.overwrite`: {out} holds this run's own input {inside[0]}; replacing the folder "
                          "would delete it, so choose another output.dir")
    return entries


def clear_earlier_run(out: Path, entries: list[Path]) -> None:
    """`output.overwrite`: the new run starts from an empty folder. The manifest goes first, so a kill
    midway never leaves a folder that looks complete."""
    for entry in sorted(entries, key=lambda p: p.name != MANIFEST):
        remove_tree(entry)
    if entries:
        console.print(f"output.overwrite: removed the earlier run's {len(entries)} file(s) and folder(s) from {out}")


def refuse_bad_data(report: DataReport, cfg: RunConfig, role: str) -> None:
    if report.problems and not cfg.data.skip_bad:
        raise DataError(
            report.problems,
            f"{role} data: {report.bad} bad sample(s), {len(report.problems)} problem(s); fix them "
            "(see `vlmtune data check`) or set data.skip_bad=true to skip those samples",
        )


def confine_images(report: DataReport, roots: list[str]) -> None:
    """`data.confine_images`: a sample whose image resolves (symlinks followed) outside every root
    becomes a problem naming the sample."""
    resolved = [Path(root).resolve() for root in roots]
    kept = []
    for sample in report.samples:
        outside = [image for image in sample.images if not any(image.resolve().is_relative_to(r) for r in resolved)]
        if outside:
            report.problems.append(Problem(sample.where, sample.id, f"image {outside[0]} is outside "
                                           f"{' and '.join(map(str, resolved))} (data.confine_images=true)"))
        else:
            kept.append(sample)
    report.samples = kept


def prepare_data(report: DataReport, cfg: RunConfig, encoder: SampleEncoder, role: str) -> DataReport:
    """Encode a checked split; refuse bad samples unless `data.skip_bad` (then count them)."""
    refuse_bad_data(encode_checked(report, encoder), cfg, role)
    for line in report.summary():
        console.print(f"\\[{role}] {line}")
    if report.problems:
        console.print(f"\\[{role}] [yellow]skipped {report.bad} bad sample(s) (data.skip_bad=true; every one is "
                      f"listed in {Path(cfg.output.dir) / SKIPPED_FILE}):[/]")
        for problem in report.problems[:10]:
            console.print(f"  - {problem}")
    if not report.encoded:
        raise DataError(report.problems, f"{role} data: no usable samples")
    return report


def load_or_build(cfg: RunConfig) -> LoadedModel:
    """The model to train: any layout `model.path` names, or a new VLM from `model.vision` + `model.llm`;
    then `model.weights` over it."""
    m = cfg.model
    options = load_options(cfg)
    if m.path:
        loaded = load_any(m.path, options=options, components=m.components)
    elif m.projector_weights:
        loaded = assemble(Parts(llm=Path(m.llm), vision=Path(m.vision), projector=Path(m.projector_weights)), options)
    else:
        family = builder(m.family)
        family.check_requirements()
        parts = {k: v for k, v in (("vision_aux", m.vision_aux), ("image_size_aux", m.image_size_aux),
                                   ("image_grid", m.image_grid), ("image_global", m.image_global)) if v}
        if parts and "vision_aux" not in inspect.signature(family.build).parameters:
            raise ConfigError(f"{' / '.join(f'`model.{k}`' for k in parts)}: for a dual-encoder family (`model.family: "
                              f"mgm`); the {family.name} family has one vision encoder, so remove them")
        model, processor = family.build(m.vision, m.llm, m.projector, options, **parts)
        sources = {c: "new" for c in family.components} | {"vision": m.vision, "llm": m.llm,
                                                            "projector": f"new ({m.projector})"}
        if m.vision_aux:
            sources["vision_aux"] = m.vision_aux
        loaded = LoadedModel(model, processor, family, Path(m.vision), "built", sources=sources)
    if m.weights:
        for component in apply_state_dict(loaded.model, loaded.family, m.weights):
            loaded.sources[component] = f"{m.weights} (state dict)"
        loaded.kind = "built" if loaded.kind == "full" else loaded.kind  # no longer the folder on disk
    return loaded


def load_options(cfg: RunConfig) -> LoadOptions:
    m = cfg.model
    q = cfg.tune.quant
    quantize = ((4 if cfg.tune.quantize == "4bit" else 8), q.type, q.double_quant, q.compute_dtype,
                tuple(q.components)) if cfg.tune.quantize else None
    # as `model.dtype` documents: as saved, but float32 on CPU (a fp16 Vicuna does not train there)
    dtype = m.dtype or (None if torch.cuda.is_available() else "float32")
    return LoadOptions(trust_remote_code=m.trust_remote_code, dtype=dtype, attn_implementation=m.attn_implementation,
                       quantize=quantize)


def ensure_base_on_disk(loaded: LoadedModel, out: Path, write: bool = True) -> Path:
    """An adapter needs a base folder: a plain full model is its own; anything else is saved once (by
    the main process). The absolute path is what the adapter records, so it loads from anywhere."""
    if loaded.kind == "full":
        base = loaded.path.resolve()
    else:
        base = (out / BASE_DIR).resolve()
        if write:
            save_model_folder(loaded.model, loaded.processor, base, {"role": "base model of the adapter in ..",
                                                                     "sources": loaded.sources})
    loaded.model.name_or_path = loaded.model.config._name_or_path = str(base)
    return base


def training_arguments(cfg: RunConfig, staging: Path, precision: str, has_eval: bool) -> TrainingArguments:
    t = cfg.train
    eval_steps = t.eval_steps or (t.save_steps or None)
    several = Processes.from_env().several
    strategy = t.distributed.strategy if several else None
    return TrainingArguments(
        ddp_backend=backend(cfg) if several else None,
        deepspeed=deepspeed_config(cfg) if strategy == "deepspeed" else None,
        fsdp=strategy == "fsdp",
        fsdp_config=fsdp_config(cfg) if strategy == "fsdp" else None,
        output_dir=str(staging),
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
        activation_checkpointing=t.gradient_checkpointing is True,  # a list of components: see `recompute`
        activation_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing is True else None,
        logging_steps=t.logging_steps,
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500,
        save_total_limit=None,  # pruning is CompleteCheckpoints' job: it never deletes the newest complete one
        eval_strategy="steps" if has_eval and eval_steps else "no",
        eval_steps=eval_steps,
        report_to=["tensorboard"] if t.tensorboard else "none",
        remove_unused_columns=False,
        prediction_loss_only=True,  # evaluation reports the loss; no logits are kept
        dataloader_num_workers=cfg.data.num_workers,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=False,
    )


def base_record(loaded: LoadedModel, base_path: Path | None) -> dict:
    """What the run started from: the base folder (with fingerprint) or the parts a new VLM was built from."""
    if base_path is not None:
        return {"path": str(base_path), "fingerprint": model_fingerprint(base_path), "sources": loaded.sources}
    if loaded.kind == "built":
        parts = {c: {"path": str(Path(p).resolve()), "fingerprint": model_fingerprint(Path(p))}
                 for c, p in loaded.sources.items() if Path(p).is_dir()}
        return {"built_from": parts, "sources": loaded.sources}
    return {"path": str(loaded.path.resolve()), "fingerprint": model_fingerprint(loaded.path), "sources": loaded.sources}


def components_record(plan: TuningPlan, model, files: dict[str, list[str]]) -> dict:
    return {row.name: {"mode": row.mode, "trained": row.mode != "frozen", "params": row.total,
                       "trainable_params": row.trainable, "files": files.get(row.mode, files.get("*", []))}
            for row in plan.rows(model)}


def train(cfg: RunConfig, resume: str | bool | None = None, force_resume: bool = False) -> TrainResult:
    """Run one training job described by `cfg`; returns where the model went and how the loss moved.

    The run holds `output.dir` from start to end: a second run on the same folder is refused."""
    out = Path(cfg.output.dir)
    precision = check_environment(cfg, out)  # what needs no file comes first
    processes = Processes.from_env()
    check_strategy(cfg, processes)
    check_paths(cfg)  # before the lock: `output.dir` may be a file
    console.quiet = not processes.main  # the plan, the load report and the data summary print once
    with hold_output_dir(out) if processes.main else contextlib.nullcontext():
        return _train_holding_output_dir(cfg, out, resume, force_resume, precision, processes)


def check_environment(cfg: RunConfig, out: Path) -> str:
    """The precision this machine runs, and the optional packages the config asks for."""
    precision = resolve_precision(cfg.train.precision)
    if cfg.train.tensorboard:
        if importlib.util.find_spec("tensorboard") is None:
            raise ConfigError("`train.tensorboard`: the tensorboard package is not installed; pip install 'vlmtune[tensorboard]'")
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(out / "runs")  # not under the checkpoint staging folder
    return precision


def _train_holding_output_dir(cfg: RunConfig, out: Path, resume: str | bool | None, force_resume: bool,
                              precision: str, processes: Processes) -> TrainResult:
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    resume = resume if resume is not None else cfg.train.resume
    try:
        checkpoint = resume_point(out, resume, say=lambda line: console.print(f"[yellow]{line}[/]"))
    except FileNotFoundError as err:
        raise ConfigError(str(err)) from None
    earlier = check_output_dir(out, cfg) if checkpoint is None else []
    # the checks that need no model come first: broken data fails fast, before any weights load. With
    # several processes the first on each machine checks and encodes; the others read its result
    prepares = processes.local_rank == 0
    shared = shared_file(out) if processes.share_on_machine else None
    reports = {role: check_data(files, cfg.data.images_root, cfg.data.max_image_pixels, cfg.data.downscale_large_images)
               for role, files in (("train", cfg.data.train), ("eval", cfg.data.eval)) if files and prepares}
    for role, report in reports.items():
        if cfg.data.confine_images:
            confine_images(report, [cfg.data.images_root] if cfg.data.images_root else [str(Path(f).parent) for f in report.files])
        refuse_bad_data(report, cfg, role)

    # before the model loads (DeepSpeed ZeRO-3 partitions it as it is built); with several processes this
    # also joins the process group
    args = training_arguments(cfg, out / STAGING, precision, bool(cfg.data.eval))
    set_seed(cfg.train.seed)
    loaded = load_or_build(cfg)
    for line in loaded.report():
        console.print(line)
    joined = "packing" if cfg.data.packing else "padding_free" if cfg.data.padding_free else None
    if joined and not loaded.family.packing:
        able = ", ".join(f.name for f in families() if f.packing)
        raise ConfigError(f"`data.{joined}`: packed rows are not supported for the {loaded.family.name} family yet (they "
                          f"are for {able}); set data.{joined}=false")
    max_pixels = cfg.data.max_image_pixels if cfg.data.downscale_large_images else None
    encoder = SampleEncoder(loaded.processor, loaded.family, cfg.data.max_length, cfg.data.loss_on, cfg.data.chat_template,
                            max_pixels)
    if encoder.renderer.template is not None:  # the template trained with is the one saved and served
        loaded.processor.chat_template = encoder.renderer.template
    if prepares:
        reports = {role: prepare_data(report, cfg, encoder, role) for role, report in reports.items()}
        if shared is not None:
            write_reports(shared, reports)
    barrier()
    if not prepares:
        reports = read_reports(shared)
    barrier()  # every process on the machine has read it
    if shared is not None and prepares:
        shared.unlink(missing_ok=True)
    train_data, eval_data = reports["train"], reports.get("eval")
    # what this run is: compared with a checkpoint's before anything in output.dir (e.g. base/) is rewritten
    identity = {"config": cfg.model_dump(), "data": {"fingerprint": data_fingerprint(cfg.data.train)},
                "source": base_record(loaded, None)}
    if checkpoint is not None:
        differences = run_differences(read_manifest(checkpoint), identity)
        if differences and not force_resume:
            raise ConfigError(f"--resume: {checkpoint} belongs to another run ({'; '.join(differences)}); resume with the "
                              "config that wrote it, or pass --force-resume to continue from it anyway")
        if differences:
            console.print(f"[yellow]--force-resume: continuing from {checkpoint} although {'; '.join(differences)}[/]")
        refuse_finished_run(checkpoint, out, planned_steps(cfg, len(pack_groups(
            [len(item.input_ids) for item in train_data.encoded], cfg.data.max_length)) if cfg.data.packing
            else len(train_data.encoded)))

    out.mkdir(parents=True, exist_ok=True)
    barrier()  # every process has read what the earlier run left before the main one removes it
    if processes.main:
        clear_earlier_run(out, earlier)
        for line in clean_staging(out):
            console.print(line)
        if any(report.problems for report in reports.values()):
            write_problems(out / SKIPPED_FILE, {role: report.problems for role, report in reports.items()})
    plan = TuningPlan(cfg.tune, loaded.family, cfg.train.lr)
    delta = cfg.output.save == "delta" and not plan.uses_lora
    base_path = ensure_base_on_disk(loaded, out, processes.main) if plan.uses_lora or delta else None
    barrier()
    model = plan.apply(loaded.model)
    if args.fsdp_plugin_args is not None:  # FSDP2's units, from the family's LLM
        args.fsdp_plugin_args["transformer_cls_names_to_wrap"] = ",".join(fsdp_layer_classes(model, loaded.family))
    if isinstance(cfg.train.gradient_checkpointing, list):
        for component, modules in recompute(model, loaded.family, cfg.train.gradient_checkpointing).items():
            console.print(f"gradient checkpointing: {component} ({', '.join(modules)})")
    console.print(plan_table(plan.rows(model)))
    if plan.kept_frozen:
        console.print(f"[yellow]note:[/] {', '.join(plan.kept_frozen)} stay frozen: a PEFT adapter can only carry whole "
                      "modules beside its LoRA weights (train without LoRA to tune them)")

    record = {"family": loaded.family.name, "family_components": {c: list(p) for c, p in loaded.family.components.items()},
              "base": base_record(loaded, base_path), "source": identity["source"], "plan": plan.describe(),
              "data": {"train": cfg.data.train, "eval": cfg.data.eval, "fingerprint": identity["data"]["fingerprint"],
                       "train_samples": len(train_data.encoded), "skipped": train_data.bad,
                       "truncated": train_data.truncated,
                       "skipped_list": SKIPPED_FILE if any(r.problems for r in reports.values()) else None},
              "config": identity["config"]}

    weights = "adapter_model.safetensors" if plan.uses_lora else "model.safetensors"
    files = {"*": [weights], "frozen": [f"base: {base_path}"] if plan.uses_lora else [weights]}  # per mode

    def checkpoint_record(state) -> dict:
        losses = [h["loss"] for h in state.log_history if "loss" in h]
        return {**record, "components": components_record(plan, model, files),
                "state": {"step": state.global_step, "epoch": state.epoch, "last_loss": losses[-1] if losses else None}}

    if checkpoint is not None:
        if processes.main:
            truncate_log(out / LOG_FILE, after_step=read_manifest(checkpoint)["state"]["step"])
        if not plan.uses_lora:  # adapters resume correctly through the Trainer; full weights need this
            restore_full_weights(model, checkpoint, loaded.family)
        elif args.fsdp:  # ... except under FSDP, where the Trainer reads only accelerate's own files
            restore_adapter_weights(model, checkpoint)
        console.print(f"resuming from {checkpoint}")
    cache = cfg.data.image_cache_mb * 2**20
    dataset = ConversationDataset(train_data.encoded, loaded.processor, loaded.family, max_pixels, cache)
    eval_dataset = ConversationDataset(eval_data.encoded, loaded.processor, loaded.family, max_pixels,
                                       cache) if eval_data else None
    collator = collator_for(loaded.family, loaded.processor.tokenizer.pad_token_id)
    if joined:
        dataset = PackedDataset(dataset, cfg.data.max_length if cfg.data.packing else None)
        collator = PackedRows(collator, one_row=cfg.data.padding_free)
        per_sample = "; attention per sample (sdpa_packed)" if switch_to_segments(model) else ""
        if cfg.data.packing:
            console.print(f"data.packing: {len(train_data.encoded)} samples in {len(dataset)} row(s) of up to "
                          f"{cfg.data.max_length} tokens ({sum(dataset.row_lengths()) / len(dataset):.0f} on average)"
                          + per_sample)
        else:
            console.print(f"data.padding_free: each batch's {cfg.train.batch_size} samples joined in one row" + per_sample)
    lengths = (dataset.row_lengths() if joined else [len(item.input_ids) for item in dataset.items]
               ) if cfg.data.group_by_length else None
    trainer = VlmTrainer(
        model=model,
        args=args,
        data_collator=collator,
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        processing_class=loaded.processor,
        callbacks=[JsonlLogger(out / LOG_FILE), CompleteCheckpoints(out, checkpoint_record, cfg.train.save_total_limit)],
        param_groups=lambda wrapped: plan.param_groups(wrapped, cfg.train.weight_decay),
        family=loaded.family,
        lengths=lengths,
    )
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(StepLines)
    started = time.perf_counter()
    try:
        with trained_as_training_runs(model, loaded.family, trainer.slice_logits) as form, collector_frozen():
            trainer.kept_positions = form.kept
            if form.unused:
                console.print("not run in training (their output never reaches the LLM; saved unchanged): "
                              + ", ".join(form.unused))
            if form.mlp:
                console.print(f"{form.mlp} runs only at the positions with a label (the others reach no logit)")
            if form.dropouts and args.use_cpu:
                console.print(f"LoRA dropout on the CPU: the dropped positions of {form.dropouts} layer(s) drawn by "
                              "their gaps (the same Bernoulli masks, one random draw per dropped element)")
            output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
            seconds = time.perf_counter() - started
            final_step = trainer.state.global_step
            if eval_dataset is not None and not any(  # the last eval step already evaluated the final weights
                    "eval_loss" in h and h.get("step") == final_step for h in trainer.state.log_history):
                trainer.evaluate()
    except KeyboardInterrupt:
        for callback in trainer.callback_handler.callbacks:
            if isinstance(callback, StepLines):
                callback.close()
        if processes.main:
            clean_staging(out)
            plot_loss(out / LOG_FILE, out / PLOT_FILE)
        raise TrainingInterrupted(trainer.state.global_step, trainer.state.max_steps, latest_checkpoint(out)) from None
    except Exception as err:  # torch, safetensors and the OS each report a full disk their own way
        if not is_disk_full(err):
            raise
        if processes.main:
            clean_staging(out)  # the half-written checkpoint
        trainable = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
        raise disk_full_error(out, model_bytes(model) + 2 * trainable, err) from None

    release_training_state(trainer)
    final = checkpoint_record(trainer.state)
    delta_keys = None
    if delta:
        tuned = {c for c in plan.components if plan.mode(c) != "frozen"}
        delta_keys = {k for k in model.state_dict() if plan.component_of(k) in tuned}
        final["components"] = components_record(plan, model, {"*": [DELTA_WEIGHTS], "frozen": [f"base: {base_path}"]})
    # under FSDP each process holds shards: every process takes part in gathering the full tensors
    gathered = trainer.accelerator.get_state_dict(trainer.model) if trainer.is_fsdp_enabled else None
    if processes.main:
        save_model_folder(model, loaded.processor, out, final, delta_keys=delta_keys, run_folder=True,
                          state_dict=gathered)
        if plan.uses_lora and cfg.output.merge:
            # sharded LoRA layers cannot merge in place: merge the adapter just saved, as `vlmtune merge` does
            merged = model.merge_and_unload() if gathered is None else load_model(out, options=replace(
                load_options(cfg), quantize=None), check=False).model
            save_model_folder(merged, loaded.processor, out / MERGED_DIR,
                              {**final, "components": components_record(plan, model, {"*": ["model.safetensors"]}),
                               "merged_from": str(out)})
        clean_staging(out)
        plot_loss(out / LOG_FILE, out / PLOT_FILE)
        # a QLoRA adapter is checked on the unquantized base it records, as users load it
        check_run_outputs(out, cfg.output.merge and plan.uses_lora, replace(load_options(cfg), quantize=None))
    barrier()  # the others end once the folder is complete and verified
    losses = [r["loss"] for r in read_log(out / LOG_FILE) if "loss" in r]
    kind = f"LoRA adapter on {base_path}" if plan.uses_lora else (f"delta on {base_path}" if delta else "full model")
    if losses:
        loss = f"loss {losses[0]:.4f} -> {losses[-1]:.4f}"
    else:  # fewer steps than train.logging_steps: only the Trainer's mean is known
        loss = (f"mean loss {output.training_loss:.4f} (no step was logged: train.logging_steps="
                f"{cfg.train.logging_steps} is more than the steps run)")
    console.print(f"[green]saved and verified[/] {out} ({kind}); {trainer.state.global_step} steps in {seconds:.1f}s; {loss}")
    return TrainResult(out, trainer.state.global_step, losses[-1] if losses else None, losses[0] if losses else None,
                       seconds, train_data.bad)


def planned_steps(cfg: RunConfig, samples: int) -> int:
    """Optimizer steps the run takes, counted as the Trainer counts them on one device."""
    if cfg.train.max_steps:
        return cfg.train.max_steps
    per_epoch = max(math.ceil(math.ceil(samples / cfg.train.batch_size) / cfg.train.grad_accum), 1)
    return math.ceil(cfg.train.epochs * per_epoch)


def refuse_finished_run(checkpoint: Path, out: Path, planned: int) -> None:
    """Resuming a run that already reached its last step would train nothing, yet save and prune again."""
    done = max(read_manifest(folder)["state"]["step"] for folder in (checkpoint, out)
               if (read_manifest(folder) or {}).get("state"))
    if done >= planned:
        raise ConfigError(
            f"--resume: the run in {out} already finished ({done} of {planned} steps); nothing was changed. To train "
            f"further, raise train.max_steps (or train.epochs) and resume; to fine-tune its result, start a new run "
            f"with model.path={out}"
        )


def check_run_outputs(out: Path, merged: bool, options: LoadOptions | None = None) -> None:
    """`verify` on the final folder (and the merged one); each checkpoint's manifest lists files that exist."""
    for folder in [out] + ([out / MERGED_DIR] if merged else []):
        result = verify(folder, options=options)
        if not result.ok:
            failed = next(f"{step}: {detail}" for step, passed, detail in result.steps if not passed)
            raise RuntimeError(f"the saved model in {folder} failed verification ({failed})")
    for checkpoint in complete_checkpoints(out):
        missing = [name for name in read_manifest(checkpoint)["files"] if not (checkpoint / name).is_file()]
        if missing:
            raise RuntimeError(f"{checkpoint} is missing {missing} listed in its manifest")
