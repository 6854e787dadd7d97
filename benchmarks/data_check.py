"""How long `vlmtune data check` takes on a large data set (default 100k samples, each with its own image).

Measures the structural check (parse + decode every image, JPEG at reduced size) and the full check
against a model (chat template + tokenization + image-token budget), and the peak memory of the process.

    .venv/bin/python benchmarks/data_check.py --samples 100000 --work /tmp/vlmtune-bench
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from vlmtune.checkpoints.load import load_model  # noqa: E402
from vlmtune.checkpoints.save import save_model_folder  # noqa: E402
from vlmtune.data.check import check_data, encode_checked  # noqa: E402
from vlmtune.data.encode import SampleEncoder  # noqa: E402
from vlmtune.demo import shapes  # noqa: E402
from vlmtune.models import llava, tiny  # noqa: E402


def make_data(work: Path, samples: int) -> Path:
    data = work / f"data_{samples}.jsonl"
    if data.is_file():
        return data
    rng = random.Random(0)
    images = shapes.write_images(work / "images", samples, rng, "img")
    with open(data, "w") as fh:
        for i, (path, scene) in enumerate(images):
            question = rng.choice(list(shapes.QUESTIONS))
            turns = [{"from": "human", "value": f"<image>\n{shapes.QUESTIONS[question]}"},
                     {"from": "gpt", "value": scene.answer(question)},
                     {"from": "human", "value": shapes.CAPTION_PROMPT}, {"from": "gpt", "value": scene.caption()}]
            fh.write(json.dumps({"id": i, "image": path, "conversations": turns}) + "\n")
    return data


def make_model(work: Path) -> Path:
    folder = work / "model"
    if not (folder / "config.json").is_file():
        tokenizer = tiny.build_tokenizer(shapes.corpus(), 512)
        vision = tiny.save_vision_encoder(work / "parts" / "vision")
        llm = tiny.save_language_model(work / "parts" / "llm", tokenizer)
        save_model_folder(*llava.build(str(vision), str(llm)), folder, {"role": "benchmark model"})
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--work", default="/tmp/vlmtune-bench")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    data = make_data(work, args.samples)
    print(f"data: {data} ({args.samples} samples, made or reused in {time.perf_counter() - started:.1f}s)")

    started = time.perf_counter()
    report = check_data([str(data)])
    structural = time.perf_counter() - started
    assert not report.problems and len(report.samples) == args.samples

    loaded = load_model(make_model(work))
    started = time.perf_counter()
    encode_checked(report, SampleEncoder(loaded.processor, loaded.family, 2048))
    tokenize = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"structural check (parse + decode images): {structural:.1f}s = {args.samples / structural:,.0f} samples/s")
    print(f"tokenize against the model:                {tokenize:.1f}s = {args.samples / tokenize:,.0f} samples/s")
    print(f"total with --model: {structural + tokenize:.1f}s; peak memory {peak_mb:,.0f} MiB")


if __name__ == "__main__":
    main()
