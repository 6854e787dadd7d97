"""`vlmtune demo`: build a tiny VLM from scratch and teach it synthetic shapes in two stages.

It goes through the same `train` and `evaluate` code a user's run takes: configs are written as
YAML files into the output folder and loaded like any other.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

from vlmtune.checkpoints.save import save_model_folder
from vlmtune.config import load_config
from vlmtune.console import console
from vlmtune.demo import shapes
from vlmtune.inference.generate import evaluate
from vlmtune.models import tiny
from vlmtune.models.registry import builder
from vlmtune.training.run import train

VISION = {"image_size": shapes.IMAGE_SIZE, "patch_size": 8, "hidden": 96, "layers": 3}  # a small ViT
LLM = {"hidden": 128, "layers": 2}  # a small Llama
STAGE1 = {  # alignment on captions; nothing is pretrained, so every component trains
    "tune": {"vision": "full", "projector": "full", "llm": "full"},
    "train": {"epochs": 12, "batch_size": 32, "lr": 2e-3, "warmup_ratio": 0.05, "logging_steps": 20, "save_steps": 0},
}
STAGE2 = {  # instruction tuning on questions mixed with the captions: the vision encoder stays as stage 1 left it
    "tune": {"vision": "frozen", "projector": "full", "llm": "full"},
    "train": {"epochs": 8, "batch_size": 32, "lr": 5e-4, "warmup_ratio": 0.05, "logging_steps": 20, "save_steps": 0},
}


def write_config(path: Path, model: dict, data: list[Path], stage: dict, out: Path) -> Path:
    config = {"model": model, "data": {"train": [str(f) for f in data], "max_length": 128}, **stage,
              "output": {"dir": str(out), "overwrite": True}}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_demo(out: str | Path = "demo-out", train_images: int = 2000, eval_images: int = 200, seed: int = 0) -> dict:
    out = Path(out).resolve()
    started = time.perf_counter()
    console.rule("vlmtune demo: data")
    files = shapes.make_dataset(out / "data", train_images, eval_images, seed)
    console.print(f"{train_images} training and {eval_images} held-out images in {out / 'data'}")

    console.rule("building a tiny VLM from scratch")
    tokenizer = tiny.build_tokenizer(shapes.corpus(), vocab_size=512)
    vision = tiny.save_vision_encoder(out / "parts" / "vision", **VISION, seed=seed)
    lm = tiny.save_language_model(out / "parts" / "llm", tokenizer, **LLM, seed=seed)
    model, processor = builder().build(str(vision), str(lm))  # the default family built from parts (LLaVA)
    untrained = save_model_folder(model, processor, out / "stage0", {"role": "untrained demo model"})
    before = evaluate(untrained, files["eval"], out=out / "eval_before.jsonl", max_new_tokens=8, batch_size=50)
    console.print(f"accuracy before training: {before['accuracy']:.3f}")

    console.rule("stage 1: alignment on captions")
    stage1 = write_config(out / "stage1.yaml", {"vision": str(vision), "llm": str(lm)}, [files["captions"]], STAGE1, out / "stage1")
    result1 = train(load_config(stage1))
    console.rule("stage 2: instruction tuning on questions")
    stage2 = write_config(out / "stage2.yaml", {"path": str(result1.output_dir)}, [files["questions"], files["captions"]], STAGE2, out / "stage2")
    result2 = train(load_config(stage2))

    console.rule("evaluation on held-out images")
    after = evaluate(result2.output_dir, files["eval"], out=out / "eval_after.jsonl", max_new_tokens=8, batch_size=50)
    report = {
        "accuracy_before": before["accuracy"],
        "accuracy_after": after["accuracy"],
        "eval_samples": after["evaluated"],
        "train_seconds": round(result1.train_seconds + result2.train_seconds, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "stage1": {"steps": result1.steps, "loss_first": result1.first_loss, "loss_last": result1.final_loss},
        "stage2": {"steps": result2.steps, "loss_first": result2.first_loss, "loss_last": result2.final_loss},
        "model": str(result2.output_dir),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    console.rule("demo summary")
    console.print(
        f"held-out accuracy {report['accuracy_before']:.3f} -> [bold]{report['accuracy_after']:.3f}[/] "
        f"({report['eval_samples']} questions); training {report['train_seconds']}s, total {report['total_seconds']}s\n"
        f"report: {out / 'report.json'}; model: {result2.output_dir} (try: vlmtune chat {result2.output_dir} "
        f"--image {out / 'data' / 'images' / 'eval_00000.png'})"
    )
    return report
