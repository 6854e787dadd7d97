"""The built-in demo, run exactly as a user runs it: a model built from scratch must learn."""

import json

from vlmtune.cli import main


def test_demo_learns_held_out_questions(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["accuracy_after"] >= 0.90
    assert report["accuracy_before"] <= 0.35  # chance: 1/3 for shape, 1/4 for colour and quadrant, 1/2 for size
    assert report["eval_samples"] == 200
    for stage in ("stage1", "stage2"):
        assert report[stage]["loss_last"] < 0.25 * report[stage]["loss_first"]
    results = [json.loads(line) for line in (out / "eval_after.jsonl").read_text().splitlines()]
    assert sum(r["correct"] for r in results) / len(results) == report["accuracy_after"]
    for name in ("stage1.yaml", "stage2.yaml", "stage1/model.safetensors", "stage2/model.safetensors",
                 "stage2/loss.png", "stage2/trainer_log.jsonl"):
        assert (out / name).exists(), name


def test_mgm_demo_marks_sit_inside_one_low_resolution_pixel(tmp_path):
    """Each mark is five dark pixels inside one 4x4 cell: one pixel of the 16x16 view the ViT gets."""
    from PIL import Image

    from vlmtune.demo import detail

    files = detail.make_dataset(tmp_path, train_images=6, eval_images=3, seed=0)
    records = [json.loads(line) for line in files["train"].read_text().splitlines()]
    assert len(records) == 6 and {r["conversations"][1]["value"] for r in records} <= set(detail.MARKS)
    cell = detail.IMAGE_SIZE // detail.LOW_RES
    for record in records:
        image = Image.open(tmp_path / record["image"]).convert("L")
        dark = [(x, y) for x in range(image.width) for y in range(image.height) if image.getpixel((x, y)) < 100]
        assert len(dark) == 5 and len({(x // cell, y // cell) for x, y in dark}) == 1
