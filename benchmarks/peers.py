"""vlmtune beside TRL's SFTTrainer and LLaMA-Factory on the same job, runs alternating, each in its own
process: the same LLaVA model (from packing.py's builder), the same mixed-length data (0-2 images, one to
four turns, short and long answers), batch, steps, learning rate, AdamW, on the CPU. Prints per run: training
seconds (the Trainer's loop), samples/s, supervised tokens/s (as each tool labels them), peak resident
memory, seconds from process start to the first optimizer step, final loss, real tokens per sample (each
tool's own chat format); each tool's useful FLOPs (MFU) and executed FLOPs (exec) against this machine's
fp32 matmul peak, measured in the same run (the faster of a measurement before the runs and one after
them), and its executed matrix work per sample; vlmtune's samples/s ratio to each peer and to the best
one, split into its two factors: how much less work a sample costs (packing: no padding; the vision
layers the LLM does not read are not run, nor the last MLP where no logit is taken) and how fast that
work runs (what a step spends outside matrix products). vlmtune runs three ways: padded batches,
packed rows (`data.packing`: rows of --max-length tokens, --packed-rows of them a step, so a step holds
more samples than the peers' batch) and padding-free batches (`data.padding_free`: the peers' batch of
--batch-size samples a step, joined in one row: the same samples per step).

TRL is a benchmark-only dependency, installed beside the environment without touching it:

    .venv/bin/pip install --target .bench-deps --no-deps trl==1.16.0 datasets dill==0.3.9 \
        multiprocess==0.70.17 xxhash pandas "pyarrow==24.*" fsspec
    .venv/bin/python benchmarks/peers.py --deps .bench-deps --repeats 2

(datasets 5.2 wants dill < 0.4.2 and pyarrow >= 24. Here `Dataset.from_list` of these records
still failed in datasets' fingerprinting — a PicklingError on pyarrow's `MonthDayNano` — so TRL gets
an `IterableDataset`, which is not fingerprinted; the samples are the same.) TRL's documented VLM path (a `messages` + `images`
dataset, its vision collator) computes the loss on
every token, prompt and image placeholders included (`assistant_only_loss` needs a chat template with
generation marks); vlmtune's on the answers only. So the losses differ by design, and the fair speed
figure is samples/s. Two of SFTConfig's defaults are set back to the other tools' here: `bf16`
(true when `fp16` is unset, on the CPU too: autocast to bf16) and `gradient_checkpointing` (true), so
that every tool trains in fp32 without recomputation. What bf16 costs depends on the CPU: emulated
without AVX-512 BF16, 10 steps took 67.7 s instead of 3.5 s (a 2-core AVX2 machine, 2026-12-02); with
it, 2.79 s instead of 2.59 s (this machine, 2026-12-03). Checkpointing: 4.0 s instead of 3.5 s
(2026-12-02). TRL figures before
2026-12-02 were measured with both on.

LLaMA-Factory needs its own environment (it pins its own transformers, 5.6 with llamafactory 0.9.5),
outside the repository; `--llamafactory` names its python and adds its runs (llamafactory_run.py, run by
that python, calls its `run_exp` with the job peers.py writes into the work folder):

    python3 -m venv /work/lf-venv
    /work/lf-venv/bin/pip install torch==2.14.1 torchvision==0.29.1
    /work/lf-venv/bin/pip install llamafactory==0.9.5
    .venv/bin/python benchmarks/peers.py --deps .bench-deps --llamafactory /work/lf-venv/bin/python --repeats 2

LLaMA-Factory trains on the answers only (its default, as vlmtune), so its loss and supervised tokens
compare with vlmtune's; its `llava` template writes USER:/ASSISTANT: as text, so its samples are longer
(tok/sample).

ms-swift too (4.6 pins transformers 5.19 and modelscope); `--swift` names its python and adds its runs
(swift_run.py, run by that python, calls its `sft_main` with the job peers.py writes into the work folder).
Keep torch in the second install, or pip replaces it:

    python3 -m venv /work/swift-venv
    /work/swift-venv/bin/pip install torch==2.14.1 torchvision==0.29.1
    /work/swift-venv/bin/pip install ms-swift==4.6.0 torch==2.14.1 torchvision==0.29.1
    .venv/bin/python benchmarks/peers.py --deps .bench-deps --swift /work/swift-venv/bin/python --repeats 2

ms-swift trains on every assistant turn (its default `loss_scale`), as vlmtune; its `llava1_5_hf`
template writes USER:/ASSISTANT: as text and a newline after each `<image>`, so its samples are longer
too. Its packing and padding_free need a flash-attention implementation, so they do not run here (CPU):
its row is its padded batch, as TRL's and LLaMA-Factory's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (FULL, alternate, count_batch, job_arguments, job_config, link_inputs, report,  # noqa: E402
                     run_child)
from packing import make_data, make_model  # noqa: E402

STARTED = time.perf_counter()
TOOLS = ("vlmtune", "vlmtune-packed", "vlmtune-padding-free", "trl")
VLMTUNE = tuple(t for t in TOOLS if t.startswith("vlmtune"))
JOINS = {"vlmtune": None, "vlmtune-packed": "packing", "vlmtune-padding-free": "padding_free"}
PEERS = ("trl", "llamafactory", "swift")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def matmul_peak_gflops(size: int = 1024, seconds: float = 2.0) -> float:
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        done += 1
    return 2 * size**3 * done / (time.perf_counter() - start) / 1e9


def first_step_callback():
    """When the first optimizer step ended, counted from this process's start."""
    from transformers import TrainerCallback

    class FirstStep(TrainerCallback):
        at = None

        def on_step_end(self, args, state, control, **kwargs):
            if self.at is None:
                self.at = time.perf_counter() - STARTED

    return FirstStep()


TUNES = {"full": FULL,
         # LoRA r 16 / alpha 32 / dropout 0.05 on every linear layer of the LLM, the projector fully trained
         "lora": {"vision": "frozen", "projector": "full", "llm": "lora"}}
LLM_LINEARS = r"model\.language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def run_vlmtune(model: Path, data: Path, out: Path, steps: int, batch: int, join: str | None, tune: str,
                rows: int | None = None, max_length: int = 1024) -> dict:
    """`join`: None (padded batches), "packing" (`rows` rows of max_length tokens a step) or "padding_free"
    (each batch of `batch` samples in one row: the peers' samples per step)."""
    import torch

    from vlmtune.training import trainer as trainer_module
    from vlmtune.training.run import train

    torch.manual_seed(0)
    cfg = job_config(model, data, out, {"max_length": max_length, **({join: True} if join else {})},
                     {"max_steps": steps, "batch_size": rows if join == "packing" and rows else batch, "weight_decay": 0.0},
                     TUNES[tune])
    seen: dict = {}
    first = first_step_callback()
    original_init, original_loss = trainer_module.VlmTrainer.__init__, trainer_module.VlmTrainer.compute_loss

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.add_callback(first)

    def counting(self, model, inputs, *args, **kwargs):
        if model.training:
            count_batch(seen, inputs, self.processing_class.tokenizer.pad_token_id)
        return original_loss(self, model, inputs, *args, **kwargs)

    trainer_module.VlmTrainer.__init__, trainer_module.VlmTrainer.compute_loss = init, counting
    result = train(cfg)
    return {"seconds": result.train_seconds, "final_loss": result.final_loss, "first_step": first.at, **seen}


def trl_records(data: Path) -> list[dict]:
    """The same samples in TRL's conversational VLM format: image blocks, then the text."""
    from PIL import Image

    records = []
    for line in data.read_text().splitlines():
        record = json.loads(line)
        messages = []
        for message in record["messages"]:
            text = message["content"]
            count = text.count("<image>")
            content = [{"type": "image"}] * count + [{"type": "text", "text": text.replace("<image>", "")}]
            messages.append({"role": message["role"], "content": content})
        images = [Image.open(data.parent / p).convert("RGB") for p in record["images"]]
        records.append({"messages": messages, "images": images})
    return records


def run_trl(model_dir: Path, data: Path, out: Path, steps: int, batch: int, tune: str) -> dict:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(model_dir)
    from datasets import IterableDataset

    records = trl_records(data)
    dataset = IterableDataset.from_generator(lambda: iter(records))
    config = SFTConfig(output_dir=str(out), max_steps=steps, per_device_train_batch_size=batch, learning_rate=1e-3,
                       lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0, logging_steps=1,
                       save_strategy="no", report_to="none", use_cpu=True, max_length=None, seed=0,
                       dataloader_num_workers=0, bf16=False, gradient_checkpointing=False,  # see above
                       dataset_kwargs={"skip_prepare_dataset": True})
    seen: dict = {}
    first = first_step_callback()

    class Counting(SFTTrainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            if model.training:
                count_batch(seen, inputs, processor.tokenizer.pad_token_id)
            return super().compute_loss(model, inputs, *args, **kwargs)

    peft_config = None
    if tune == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=LLM_LINEARS,
                                 modules_to_save=["multi_modal_projector"])
    trainer = Counting(model=model, args=config, train_dataset=dataset, processing_class=processor, callbacks=[first],
                       peft_config=peft_config)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"seconds": seconds, "final_loss": losses[-1], "first_step": first.at, **seen}


def run_llamafactory(python: str, model: Path, data: Path, out: Path, steps: int, batch: int, tune: str,
                     max_length: int = 1024) -> dict:
    """LLaMA-Factory in its own environment's python, its own process (llamafactory_run.py): the same
    data as a ShareGPT dataset (its `<image>` placeholders are LLaMA-Factory's too), its `llava` template,
    answers-only loss (its default, as vlmtune's). Its defaults that differ from the other runs are set
    back: the vision tower and projector frozen in full tuning, gradient checkpointing on, and the
    template's system prompt (vlmtune's template has none; with this tokenizer it is 124 prompt tokens
    a sample). Its USER:/ASSISTANT: tags still make its samples longer: see the tok/sample column."""
    work = data.parent
    (work / "dataset_info.json").write_text(json.dumps({"peers": {
        "file_name": data.name, "formatting": "sharegpt", "columns": {"messages": "messages", "images": "images"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}}))
    job = {"model_name_or_path": str(model), "stage": "sft", "do_train": True, "finetuning_type": tune,
           "template": "llava", "default_system": "", "dataset": "peers", "dataset_dir": str(work),
           "cutoff_len": max_length,
           "preprocessing_num_workers": 1, "overwrite_cache": True, "output_dir": str(out),
           "overwrite_output_dir": True, "per_device_train_batch_size": batch, "max_steps": steps,
           "learning_rate": 1e-3, "lr_scheduler_type": "cosine", "warmup_steps": 0, "weight_decay": 0.0,
           "logging_steps": 1, "save_strategy": "no", "report_to": "none", "use_cpu": True, "seed": 0,
           "dataloader_num_workers": 0, "disable_gradient_checkpointing": True,
           "freeze_vision_tower": tune == "lora", "freeze_multi_modal_projector": False}
    if tune == "lora":  # TUNES["lora"]: every linear layer of the LLM, the projector fully trained
        job |= {"lora_rank": 16, "lora_alpha": 32, "lora_dropout": 0.05, "lora_target": "all",
                "additional_target": "multi_modal_projector"}
    (work / "llamafactory.json").write_text(json.dumps(job, indent=1))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env |= {"HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(work / "hf-datasets")}
    launched = time.perf_counter() - STARTED  # its first step counts from this process's start, like the others'
    row = run_child([python, str(Path(__file__).with_name("llamafactory_run.py")), str(work / "llamafactory.json")],
                    "llamafactory", env)
    return {**row, "first_step": launched + row["first_step"]}


def run_swift(python: str, model: Path, data: Path, out: Path, steps: int, batch: int, tune: str,
              max_length: int = 1024) -> dict:
    """ms-swift in its own environment's python, its own process (swift_run.py): the same samples as its
    `messages` + `images` records (its `<image>` tags are ms-swift's too; the paths made absolute), the
    model as its `llava1_5_hf` type and template, loss on every assistant turn (its default `loss_scale`,
    as vlmtune's). Its defaults that differ from the other runs are set back: the vision tower and
    projector frozen in full tuning (`freeze_vit`, `freeze_aligner`), gradient accumulation up to 16
    samples a step (`ceil(16 / batch)`: 2 steps' batches an optimizer step at batch 8), LoRA rank 8, and a
    version folder under the output. Its USER:/ASSISTANT: text tags make its samples longer: see tok/sample."""
    work = data.parent
    records = [json.loads(line) for line in data.read_text().splitlines()]
    with (work / "swift.jsonl").open("w") as f:
        for record in records:
            record["images"] = [str((work / p).resolve()) for p in record["images"]]
            f.write(json.dumps({"messages": record["messages"], "images": record["images"]}) + "\n")
    job = {"model": str(model.resolve()), "model_type": "llava1_5_hf", "template": "llava1_5_hf",
           "dataset": [str(work / "swift.jsonl")], "tuner_type": tune, "torch_dtype": "float32",
           "max_length": max_length,
           "dataset_num_proc": 1, "split_dataset_ratio": 0.0, "output_dir": str(out), "add_version": False,
           "per_device_train_batch_size": batch, "gradient_accumulation_steps": 1, "max_steps": steps,
           "learning_rate": 1e-3, "lr_scheduler_type": "cosine", "warmup_ratio": 0.0, "warmup_steps": 0,
           "weight_decay": 0.0, "logging_steps": 1, "save_strategy": "no", "report_to": ["none"], "use_cpu": True,
           "seed": 0, "dataloader_num_workers": 0, "gradient_checkpointing": False, "use_hf": True,
           "freeze_llm": False, "freeze_vit": tune == "lora", "freeze_aligner": tune == "lora"}
    if tune == "lora":  # TUNES["lora"]: every linear layer of the LLM (no LoRA on the frozen tower and the
        # aligner), the projector fully trained
        job |= {"lora_rank": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": ["all-linear"],
                "modules_to_save": ["multi_modal_projector"]}
    (work / "swift.json").write_text(json.dumps(job, indent=1))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env |= {"HF_HUB_OFFLINE": "1", "MODELSCOPE_CACHE": str(work / "modelscope"),
            "HF_DATASETS_CACHE": str(work / "hf-datasets"), "CUDA_VISIBLE_DEVICES": ""}
    launched = time.perf_counter() - STARTED  # its first step counts from this process's start, like the others'
    row = run_child([python, str(Path(__file__).with_name("swift_run.py")), str(work / "swift.json")], "swift", env)
    return {**row, "first_step": launched + row["first_step"]}


def child(args) -> dict:
    work = Path(args.work)
    model, data, out = work / "model", work / "data.jsonl", work / f"out-{args.child}"
    if args.child == "trl":
        row = run_trl(model, data, out, args.steps, args.batch_size, args.tune)
    elif args.child == "llamafactory":
        row = run_llamafactory(args.llamafactory, model, data, out, args.steps, args.batch_size, args.tune,
                               args.max_length)
        return {"tool": args.child, **row}  # its peak RSS: its own process's
    elif args.child == "swift":
        row = run_swift(args.swift, model, data, out, args.steps, args.batch_size, args.tune, args.max_length)
        return {"tool": args.child, **row}
    else:
        row = run_vlmtune(model, data, out, args.steps, args.batch_size, JOINS[args.child], args.tune,
                          args.packed_rows, args.max_length)
    return {"tool": args.child, **row, "peak_rss_mib": peak_rss_mib()}


def matrices(model: Path) -> dict:
    """The model's parameter count (from the safetensors header: no tensor is read) and the sizes of the
    matrices that bear the FLOPs: the LLM's, and the vision tower's, all of its layers and those up to the
    one whose output the LLM gets (`vision_feature_layer`, -2 here; the layers after it do no useful work:
    vlmtune no longer runs them, the peers do)."""
    from safetensors import safe_open
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model)
    with safe_open(model / "model.safetensors", "pt") as weights:
        total = sum(math.prod(weights.get_slice(k).get_shape()) for k in weights.keys())
    layers = config.vision_config.num_hidden_layers
    patches = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    text = config.text_config
    return {"total": total, "llm": _params(text, 3), "last_mlp": 3 * text.hidden_size * text.intermediate_size,
            "vision_read": _params(config.vision_config, 2, config.vision_feature_layer % (layers + 1)),
            "vision_all": _params(config.vision_config, 2), "patches": patches}


def _params(config, mlp_matrices: int, layers: int | None = None) -> int:
    h, i, n = config.hidden_size, config.intermediate_size, layers if layers is not None else config.num_hidden_layers
    return n * (4 * h * h + mlp_matrices * h * i)  # attention and MLP matrices (the FLOPs-bearing ones)


def flops(row: dict, m: dict, tune: str) -> tuple[float, float]:
    """(useful, executed) matrix FLOPs of a run. Useful: its real tokens through the LLM (through its last
    MLP only where the loss takes a logit: `supervised`), the patches the LLM gets through the vision
    layers it reads. Executed: every position it computed (padding included) through the LLM (vlmtune:
    its last MLP at the supervised positions), every tower position (the class token too) through the
    layers it ran. Full tuning:
    forward and both backward products (6 per parameter and token); LoRA: the frozen LLM still passes
    gradients back (4), the frozen tower only runs forward (2). Logits (a 199-token vocabulary) and
    attention scores are left out of both."""
    llm, vision = (6, 6) if tune == "full" else (4, 2)
    ours, last = row["tool"].startswith("vlmtune"), m["last_mlp"]
    useful = (llm * ((m["llm"] - last) * row["real"] + last * row["supervised"])
              + vision * m["vision_read"] * m["patches"] * row["images"])
    lm = (m["llm"] - last) * row["positions"] + last * row["supervised"] if ours else m["llm"] * row["positions"]
    executed = llm * lm + vision * (m["vision_read"] if ours else m["vision_all"]) * (m["patches"] + 1) * row["images"]
    return useful, executed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    job_arguments(parser, samples=400, steps=30, work="/tmp/vlmtune-bench-peers")
    parser.add_argument("--tune", choices=tuple(TUNES), default="full", help="full tuning, or LoRA on the LLM")
    parser.add_argument("--packed-rows", type=int, help="rows of data.max_length tokens per packed step (default: "
                        "--batch-size); fewer rows hold fewer tokens, for a packed run within the padded runs' memory")
    parser.add_argument("--max-length", type=int, default=1024, help="every tool's truncation limit (no sample of "
                        "the job reaches 300 tokens, so it truncates nothing); vlmtune's packed rows hold this many tokens")
    parser.add_argument("--deps", help="folder with TRL and datasets (pip install --target), added for TRL's runs")
    parser.add_argument("--llamafactory", metavar="PYTHON", help="python of an environment with LLaMA-Factory "
                        "(see above); its runs join the alternation")
    parser.add_argument("--swift", metavar="PYTHON", help="python of an environment with ms-swift (see above); "
                        "its runs join the alternation")
    args = parser.parse_args()
    for peer in ("llamafactory", "swift"):
        if getattr(args, peer):
            setattr(args, peer, os.path.abspath(getattr(args, peer)))  # not resolved: a venv's python is a link
    if args.child:
        report(child(args))
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    link_inputs(work, **{"data.jsonl": make_data(work, args.samples), "model": make_model(work, args.hidden, args.layers)})
    peak = matmul_peak_gflops()
    deps = str(Path(args.deps).resolve()) if args.deps else None
    env_for = lambda tool: ({"PYTHONPATH": os.pathsep.join(filter(None, [deps, os.environ.get("PYTHONPATH")]))}  # noqa: E731
                            if tool == "trl" and deps else {})
    tools = TOOLS + (("llamafactory",) if args.llamafactory else ()) + (("swift",) if args.swift else ())
    rows = alternate(__file__, tools, args.repeats, ["--work", str(work), "--steps", str(args.steps), "--batch-size",
                                                     str(args.batch_size), "--tune", args.tune,
                                                     "--max-length", str(args.max_length)]
                     + (["--packed-rows", str(args.packed_rows)] if args.packed_rows else [])
                     + (["--llamafactory", args.llamafactory] if args.llamafactory else [])
                     + (["--swift", args.swift] if args.swift else []), env_for)
    # the machine's speed moves between runs (other tenants): the peak is the faster of two measurements,
    # before and after, so that a slow moment does not inflate the utilisation
    peak = max(peak, matmul_peak_gflops())
    m = matrices(work / "model")
    print(f"model: {m['total'] / 1e6:.1f}M parameters, {args.tune} tuning; fp32 matmul peak on this machine: "
          f"{peak:.1f} GFLOP/s")
    print("MFU: useful matrix FLOPs (real tokens, the last MLP where a logit is taken, the vision layers the LLM reads) per second, of that peak; "
          "work/sample: executed matrix GFLOPs (padding and every vision layer run included) per sample; "
          "exec: executed FLOPs per second, of the peak")
    print(f"{'tool':<15} {'loop s':>7} {'samples/s':>10} {'sup tok/s':>10} {'tok/sample':>10} {'peak MiB':>9} "
          f"{'1st step s':>10} {'final loss':>10} {'pos/step':>8} {'MFU':>6} {'work/sample':>11} {'exec':>6}")
    for row in rows:
        useful, executed = flops(row, m, args.tune)
        row["work"], row["rate"] = executed / row["samples"], executed / row["seconds"] / 1e9 / peak
        print(f"{row['tool']:<15} {row['seconds']:7.1f} {row['samples'] / row['seconds']:10.2f} "
              f"{row['supervised'] / row['seconds']:10.1f} {row['real'] / row['samples']:10.1f} "
              f"{row['peak_rss_mib']:9.0f} {row['first_step']:10.1f} "
              f"{row['final_loss']:10.4f} {row['positions'] / args.steps:8.0f} "
              f"{useful / row['seconds'] / 1e9 / peak:6.1%} {row['work'] / 1e9:11.2f} {row['rate']:6.1%}")
    mean = {t: sum(r["samples"] / r["seconds"] for r in rows if r["tool"] == t) / args.repeats for t in tools}
    peers = [t for t in PEERS if t in tools]
    best = max(peers, key=mean.get)
    average = lambda tool, key: sum(r[key] for r in rows if r["tool"] == tool) / args.repeats  # noqa: E731
    for tool in VLMTUNE:
        print(f"{tool} samples/s vs " + ", ".join(f"{t}: {mean[tool] / mean[t]:.2f}x" for t in peers)
              + f"; vs the best peer ({best}): {mean[tool] / mean[best]:.2f}x"
              f" = {average(best, 'work') / average(tool, 'work'):.2f} ({best}'s work per sample / {tool}'s)"
              f" x {average(tool, 'rate') / average(best, 'rate'):.2f} ({tool}'s exec / {best}'s)")


if __name__ == "__main__":
    main()
