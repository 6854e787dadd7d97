"""What packed rows and length-grouped batches save: the same LLaVA job (full tuning, mixed lengths: 0-2
images, one to four turns, short and long answers) trained padded, length-grouped and packed, runs
alternating, in one process each. Prints per run: training seconds, samples/s, supervised tokens/s,
the share of computed token positions that are padding, and the final loss.

    .venv/bin/python benchmarks/packing.py --samples 400 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = {"padded": {}, "grouped": {"group_by_length": True}, "packed": {"packing": True}}


def make_data(work: Path, samples: int) -> Path:
    from vlmtune.demo import shapes

    data = work / f"mixed_{samples}.jsonl"
    if data.is_file():
        return data
    rng = random.Random(0)
    images = shapes.write_images(work / "images", samples, rng, "img")
    with open(data, "w") as fh:
        for i, (path, scene) in enumerate(images):
            count = rng.choice([0, 1, 1, 1, 2])
            messages, files = [], [path] * count
            for turn in range(rng.choice([1, 1, 2, 4])):
                attribute = rng.choice(list(shapes.QUESTIONS))
                prompt = ("<image>" * count if turn == 0 else "") + shapes.QUESTIONS[attribute]
                answer = scene.caption() * rng.choice([1, 1, 3]) if rng.random() < 0.5 else scene.answer(attribute)
                messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
            fh.write(json.dumps({"id": i, "messages": messages, "images": files}) + "\n")
    return data


def make_model(work: Path, hidden: int, layers: int) -> Path:
    from vlmtune.checkpoints.save import save_model_folder
    from vlmtune.demo import shapes
    from vlmtune.models import llava, tiny

    folder = work / f"model_{hidden}_{layers}"
    if not (folder / "config.json").is_file():
        tokenizer = tiny.build_tokenizer(shapes.corpus(), 512)
        vision = tiny.save_vision_encoder(work / "parts" / "vision", image_size=32, patch_size=8, hidden=hidden,
                                          layers=layers, heads=4)
        llm = tiny.save_language_model(work / "parts" / "llm", tokenizer, hidden=hidden, layers=layers, heads=4)
        save_model_folder(*llava.build(str(vision), str(llm)), folder, {"role": "benchmark model"})
    return folder


def run_one(model: Path, data: Path, out: Path, mode: str, steps: int, batch: int) -> dict:
    """Runs in its own process (see main): train, then count what the batches held."""
    import torch

    from vlmtune.config import load_config
    from vlmtune.training.run import train

    torch.manual_seed(0)
    cfg = load_config(tree={"model": {"path": str(model)}, "data": {"train": str(data), "max_length": 1024, **MODES[mode]},
                            "tune": {"vision": "full", "projector": "full", "llm": "full"},
                            "train": {"max_steps": steps, "batch_size": batch, "lr": 1e-3, "logging_steps": 1,
                                      "save_steps": 0, "warmup_ratio": 0.0},
                            "output": {"dir": str(out), "overwrite": True}})
    seen = {"positions": 0, "real": 0, "supervised": 0, "samples": 0}
    from vlmtune.training import trainer as trainer_module

    original = trainer_module.VlmTrainer.compute_loss

    def counting(self, model, inputs, *args, **kwargs):
        if model.training:
            ids, pad = inputs["input_ids"], self.processing_class.tokenizer.pad_token_id
            seen["positions"] += ids.numel()
            seen["real"] += int((ids != pad).sum())
            seen["supervised"] += int((inputs["labels"][:, 1:] != -100).sum())
            if "pack_lengths" in inputs:  # a segment is a sample unless it is a row's padding tail
                for r, sizes in enumerate(inputs["pack_lengths"].tolist()):
                    starts = [sum(sizes[:k]) for k, n in enumerate(sizes) if n]
                    seen["samples"] += sum(int(ids[r, start] != pad) for start in starts)
            else:
                seen["samples"] += ids.shape[0]
        return original(self, model, inputs, *args, **kwargs)

    trainer_module.VlmTrainer.compute_loss = counting
    result = train(cfg)
    return {"mode": mode, "seconds": result.train_seconds, "final_loss": result.final_loss, **seen}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--work", default="/tmp/vlmtune-bench-packing")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = Path(args.work)
    if args.child:
        print("RESULT " + json.dumps(run_one(work / "model", work / "data.jsonl", work / f"out-{args.child}",
                                             args.child, args.steps, args.batch_size)))
        return
    work.mkdir(parents=True, exist_ok=True)
    for link, target in (("data.jsonl", make_data(work, args.samples)), ("model", make_model(work, args.hidden, args.layers))):
        (work / link).unlink(missing_ok=True)
        (work / link).symlink_to(target)
    rows = []
    for repeat in range(args.repeats):
        for mode in MODES:  # alternating, so a busy moment hurts every mode alike
            done = subprocess.run([sys.executable, __file__, "--child", mode, "--work", str(work), "--steps",
                                   str(args.steps), "--batch-size", str(args.batch_size)],
                                  capture_output=True, text=True, cwd=ROOT)
            line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"{mode} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
            rows.append(json.loads(line[7:]))
    print(f"{'mode':<8} {'s':>7} {'samples/s':>10} {'sup tok/s':>10} {'padding':>8} {'final loss':>10}")
    for row in rows:
        print(f"{row['mode']:<8} {row['seconds']:7.1f} {row['samples'] / row['seconds']:10.2f} "
              f"{row['supervised'] / row['seconds']:10.1f} {1 - row['real'] / row['positions']:8.1%} "
              f"{row['final_loss']:10.4f}")


if __name__ == "__main__":
    main()
