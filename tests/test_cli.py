"""The real `vlmtune` entry point: data check, train from parts, refusals with their messages."""

import json

import yaml
from conftest import color_records, make_image, write_jsonl
from transformers import AutoModelForImageTextToText, AutoProcessor

from vlmtune.cli import main


def write_config(path, **sections):
    path.write_text(yaml.safe_dump(sections))
    return str(path)


def bad_records(folder):
    records = color_records(folder, n=6)
    records[2]["image"] = "images/nope.png"
    records[4]["conversations"][0]["from"] = "robot"
    return records


def test_data_check_ok_with_model_stats(tiny_vlm, color_data, capsys):
    assert main(["data", "check", str(color_data), "--model", str(tiny_vlm)]) == 0
    out = capsys.readouterr().out
    assert "records: 24; usable: 24; bad: 0" in out
    assert "tokens per sample (images included): min 19, median 19" in out and "data check: OK" in out


def test_data_check_names_each_bad_sample(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", bad_records(tmp_path))
    assert main(["data", "check", str(data)]) == 1
    out = capsys.readouterr().out
    assert "d.jsonl line 3 (id s2): image" in out and "nope.png does not exist" in out
    assert "d.jsonl line 5 (id s4): turn 0 has unknown role 'robot'" in out
    assert "2 problem(s)" in out


def test_data_check_over_long_samples(tiny_vlm, tmp_path, capsys):
    make_image(tmp_path / "a.png")
    long_question = " ".join(["one two three"] * 20)
    data = write_jsonl(tmp_path / "d.jsonl", [{"id": "long", "image": "a.png", "conversations": [
        {"from": "human", "value": f"<image>\n{long_question}"}, {"from": "gpt", "value": "red"}]}])
    assert main(["data", "check", str(data), "--model", str(tiny_vlm), "--max-length", "30", "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert "id long" in result["problems"][0] and "no trained token fits in data.max_length=30" in result["problems"][0]


def test_train_refuses_bad_data_then_skips_with_count(tiny_vlm, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", bad_records(tmp_path))
    cfg = write_config(tmp_path / "run.yaml", model={"path": str(tiny_vlm)}, data={"train": str(data)},
                       train={"max_steps": 2, "batch_size": 2, "save_steps": 0}, output={"dir": str(tmp_path / "out")})
    assert main(["train", cfg]) == 1
    out = capsys.readouterr().out
    assert "train data: 2 bad sample(s), 2 problem(s)" in out and "nope.png does not exist" in out and "unknown role 'robot'" in out
    assert not (tmp_path / "out").exists()
    assert main(["train", cfg, "data.skip_bad=true"]) == 0
    out = capsys.readouterr().out
    assert "skipped 2 bad sample(s)" in out
    manifest = json.loads((tmp_path / "out" / "vlmtune.json").read_text())
    assert manifest["data"]["train_samples"] == 4 and manifest["data"]["skipped"] == 2


def test_train_config_errors_exit_2(tmp_path, capsys):
    cfg = write_config(tmp_path / "run.yaml", model={"path": "m"}, data={"train": "t.jsonl"}, output={"dir": "o"})
    assert main(["train", cfg, "tune.lr.vison=1e-4", "train.precision=fp8"]) == 2
    out = capsys.readouterr().out
    assert "did you mean `tune.lr.vision`?" in out and "`train.precision`" in out
    assert main(["train", cfg, "train.precision=fp16"]) == 2
    assert "fp16 needs a CUDA GPU" in capsys.readouterr().out


def test_stage1_from_vision_and_llm_folders(parts, color_data, tmp_path, capsys):
    out = tmp_path / "stage1"
    cfg = write_config(tmp_path / "stage1.yaml", model={"vision": str(parts["vision"]), "llm": str(parts["llm"]),
                                                        "projector": "linear"},
                       data={"train": str(color_data)}, tune={"vision": "frozen", "projector": "full", "llm": "frozen"},
                       train={"max_steps": 3, "batch_size": 4, "save_steps": 0}, output={"dir": str(out)})
    assert main(["train", cfg]) == 0
    printed = capsys.readouterr().out
    for row in ("│ vision    │ frozen │", "│ projector │ full   │", "│ llm       │ frozen │"):
        assert row in printed
    model = AutoModelForImageTextToText.from_pretrained(out)
    assert model.config.projector_hidden_act == "linear"
    assert AutoProcessor.from_pretrained(out).tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_id
