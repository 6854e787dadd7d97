"""What keeping processed images in memory (`data.image_cache_mb`) and data-loader workers
(`data.num_workers`) save: the same LLaVA job (packing.py's 7.6M model, 32 px vision input, full
tuning, batch 8, several epochs) on photos-sized source images (640x480 JPEG, decoded and resized
every time they are not cached), runs alternating, each in its own process. Prints per run: training
seconds, samples/s and the final loss (equal across modes: the same batches in the same order).

    .venv/bin/python benchmarks/image_cache.py --samples 200 --epochs 3 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import alternate, job_arguments, job_config, link_inputs, report  # noqa: E402
from packing import make_model  # noqa: E402

MODES = {"no cache": {"image_cache_mb": 0}, "cache": {"image_cache_mb": 1024},
         "no cache, 2 workers": {"image_cache_mb": 0, "num_workers": 2}}


def make_data(work: Path, samples: int) -> Path:
    from PIL import Image

    data = work / f"photos_{samples}.jsonl"
    if data.is_file():
        return data
    rng = random.Random(0)
    (work / "photos").mkdir(parents=True, exist_ok=True)
    colours = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 200)}
    with open(data, "w") as fh:
        for i in range(samples):
            name = rng.choice(list(colours))
            image = Image.effect_noise((640, 480), 60).convert("RGB")
            image = Image.blend(image, Image.new("RGB", image.size, colours[name]), 0.6)
            path = work / "photos" / f"{i}.jpg"
            image.save(path, quality=90)
            fh.write(json.dumps({"id": i, "images": [str(path)], "messages": [
                {"role": "user", "content": "<image>Which colour is the picture?"},
                {"role": "assistant", "content": name}]}) + "\n")
    return data


def run_one(model: Path, data: Path, out: Path, mode: str, epochs: int, batch: int) -> dict:
    import torch

    from vlmtune.training.run import train

    torch.manual_seed(0)
    cfg = job_config(model, data, out, {"max_length": 256, **MODES[mode]}, {"epochs": epochs, "batch_size": batch})
    result = train(cfg)
    return {"mode": mode, "seconds": result.train_seconds, "steps": result.steps, "final_loss": result.final_loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    job_arguments(parser, samples=200, steps=0, work="/tmp/vlmtune-bench-image-cache")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    work = Path(args.work)
    if args.child:
        report(run_one(work / "model", work / "data.jsonl", work / "out", args.child, args.epochs, args.batch_size))
        return
    work.mkdir(parents=True, exist_ok=True)
    link_inputs(work, **{"data.jsonl": make_data(work, args.samples), "model": make_model(work, args.hidden, args.layers)})
    rows = alternate(__file__, MODES, args.repeats, ["--work", str(work), "--epochs", str(args.epochs),
                                                     "--batch-size", str(args.batch_size)])
    print(f"{'mode':<20} {'s':>7} {'samples/s':>10} {'final loss':>10}")
    for row in rows:
        print(f"{row['mode']:<20} {row['seconds']:7.1f} {args.samples * args.epochs / row['seconds']:10.2f} "
              f"{row['final_loss']:10.4f}")


if __name__ == "__main__":
    main()
