"""Generate, eval and chat against a model trained in the test: answers are checked, not just produced."""

import io
import json

import pytest
from conftest import color_records, write_jsonl

from vlmtune.cli import main
from vlmtune.config import load_config
from vlmtune.inference.chat import chat
from vlmtune.inference.generate import generate_predictions
from vlmtune.training.run import train


@pytest.fixture(scope="module")
def colors(tiny_vlm, tmp_path_factory):
    """A tiny model taught to name the colour of a plain image, and its data file."""
    root = tmp_path_factory.mktemp("colors")
    data = write_jsonl(root / "train.jsonl", color_records(root, n=12))
    cfg = load_config(tree={"model": {"path": str(tiny_vlm)}, "data": {"train": str(data)},
                            "tune": {"vision": "full", "projector": "full", "llm": "full"},
                            "train": {"max_steps": 60, "batch_size": 6, "lr": 5e-3, "warmup_ratio": 0.0, "save_steps": 0},
                            "output": {"dir": str(root / "run")}})
    train(cfg)
    return root / "run", data


def test_eval_cli_reports_accuracy(colors, tmp_path, capsys):
    model, data = colors
    out = tmp_path / "results.jsonl"
    assert main(["eval", str(model), "--data", str(data), "--out", str(out), "--max-new-tokens", "4"]) == 0
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(results) == 12 and {"id", "prediction", "target", "correct"} <= set(results[0])
    accuracy = sum(r["correct"] for r in results) / len(results)
    assert accuracy == 1.0, results
    assert "exact-match accuracy 1.0000 (12/12" in capsys.readouterr().out


def test_batched_generation_matches_one_by_one(colors, tmp_path):
    model, data = colors
    batched, _ = generate_predictions(model, data, batch_size=5, max_new_tokens=4)
    single, _ = generate_predictions(model, data, batch_size=1, max_new_tokens=4)
    assert [p.prediction for p in batched] == [p.prediction for p in single]
    out = tmp_path / "preds.jsonl"
    assert main(["generate", str(model), "--data", str(data), "--out", str(out), "--batch-size", "4"]) == 0
    assert len(out.read_text().splitlines()) == 12


def test_chat_streams_the_answer(colors):
    model, data = colors
    image = data.parent / "images" / "1.png"  # green
    stdout = io.StringIO()
    conversation = chat(model, image=str(image), max_new_tokens=4,
                        stdin=io.StringIO("What color is the image?\n/quit\n"), stdout=stdout)
    assert conversation[-1] == {"role": "assistant", "content": [{"type": "text", "text": "green"}]}
    assert "model> green" in stdout.getvalue()


def test_lora_output_generates_through_its_base(colors, tmp_path):
    model, data = colors
    cfg = load_config(tree={"model": {"path": str(model)}, "data": {"train": str(data)}, "tune": {"llm": "lora"},
                            "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-6, "save_steps": 0},
                            "output": {"dir": str(tmp_path / "lora")}})
    train(cfg)
    predictions, problems = generate_predictions(tmp_path / "lora", data, max_new_tokens=4)
    assert problems == [] and sum(p.correct for p in predictions) == 12  # a near-zero step keeps the answers


def test_chat_refuses_a_bad_image_before_loading_and_keeps_the_conversation(colors, tmp_path):
    from vlmtune.config import ConfigError

    model, data = colors
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not an image")
    with pytest.raises(ConfigError) as err:
        chat(tmp_path / "no-model-here", image=str(text_file))  # the image is refused before any model loads
    assert str(err.value).startswith(f"--image: image {text_file} cannot be read: cannot identify image file")
    stdout = io.StringIO()
    green = data.parent / "images" / "1.png"
    conversation = chat(model, max_new_tokens=4, stdout=stdout, stdin=io.StringIO(
        f"/image {text_file}\n/help\n/image {green}\nWhat color is the image?\n/reset\n/bogus\n"
        f"/image {green}\nWhat color is the image?\n/quit\n"))
    out = stdout.getvalue()
    assert f"not attached: image {text_file} cannot be read: cannot identify image file" in out
    assert out.count("commands: /image PATH (attach an image to your next message), /reset (start over), /help, /quit") == 3
    assert f"attached {green} to your next message" in out and "conversation cleared" in out
    assert "unknown command /bogus" in out
    assert out.count("model> green") == 2
    assert conversation == [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the image?"}]},
                            {"role": "assistant", "content": [{"type": "text", "text": "green"}]}]
