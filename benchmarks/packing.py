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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import alternate, count_batch, job_arguments, job_config, link_inputs, report  # noqa: E402

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

    from vlmtune.training.run import train

    torch.manual_seed(0)
    cfg = job_config(model, data, out, {"max_length": 1024, **MODES[mode]}, {"max_steps": steps, "batch_size": batch})
    seen: dict = {}
    from vlmtune.training import trainer as trainer_module

    original = trainer_module.VlmTrainer.compute_loss

    def counting(self, model, inputs, *args, **kwargs):
        if model.training:
            count_batch(seen, inputs, self.processing_class.tokenizer.pad_token_id)
        return original(self, model, inputs, *args, **kwargs)

    trainer_module.VlmTrainer.compute_loss = counting
    result = train(cfg)
    return {"mode": mode, "seconds": result.train_seconds, "final_loss": result.final_loss, **seen}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    job_arguments(parser, samples=400, steps=30, work="/tmp/vlmtune-bench-packing")
    args = parser.parse_args()
    work = Path(args.work)
    if args.child:
        report(run_one(work / "model", work / "data.jsonl", work / f"out-{args.child}", args.child, args.steps,
                       args.batch_size))
        return
    work.mkdir(parents=True, exist_ok=True)
    link_inputs(work, **{"data.jsonl": make_data(work, args.samples), "model": make_model(work, args.hidden, args.layers)})
    rows = alternate(__file__, MODES, args.repeats, ["--work", str(work), "--steps", str(args.steps),
                                                     "--batch-size", str(args.batch_size)])
    print(f"{'mode':<8} {'s':>7} {'samples/s':>10} {'sup tok/s':>10} {'padding':>8} {'final loss':>10}")
    for row in rows:
        print(f"{row['mode']:<8} {row['seconds']:7.1f} {row['samples'] / row['seconds']:10.2f} "
              f"{row['supervised'] / row['seconds']:10.1f} {1 - row['real'] / row['positions']:8.1%} "
              f"{row['final_loss']:10.4f}")


if __name__ == "__main__":
    main()
