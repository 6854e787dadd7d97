"""The real `vlmtune` entry point: data check, train from parts, refusals with their messages."""

import json

import yaml
from conftest import color_records, make_image, truncated_jpeg, write_jsonl
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


def _option_actions(parser):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from ((f"{name} {n}", a) for n, a in _option_actions(sub))
        elif action.option_strings and action.dest not in ("help", "version"):
            yield "", action


def test_every_option_has_help_and_shows_its_default():
    from vlmtune.cli import build_parser

    options = list(_option_actions(build_parser()))
    assert len(options) > 30
    for where, action in options:
        assert action.help, f"{where} {action.option_strings} has no help text"
    for argv, expected in ((["generate", "--help"], "longest answer, in tokens (default: 64)"),
                           (["eval", "--help"], "eval_results.jsonl, in the current folder"),
                           (["data", "check", "--help"], "(default: assistant)"),
                           (["convert", "--help"], "output folder (written only if the whole conversion succeeds)"),
                           (["demo", "--help"], "synthetic training images to render; default: llava: 2000, mgm: 1500")):
        import contextlib
        import io

        text = io.StringIO()
        with contextlib.redirect_stdout(text), contextlib.suppress(SystemExit):
            main(argv)
        assert expected in " ".join(text.getvalue().split()), argv


def test_resume_before_the_config_keeps_the_config(tiny_vlm, color_data, tmp_path, capsys):
    cfg = write_config(tmp_path / "run.yaml", model={"path": str(tiny_vlm)}, data={"train": str(color_data)},
                       train={"max_steps": 2, "batch_size": 4, "save_steps": 0}, output={"dir": str(tmp_path / "out")})
    assert main(["train", "--resume", cfg]) == 2  # the config was read: the refusal is about the run's folder
    assert "holds no complete checkpoint-<step> folder to resume from" in capsys.readouterr().out


def test_files_the_config_names_are_checked_before_loading(parts, tiny_vlm, color_data, tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "a-file").write_text("x")
    cfg = write_config(tmp_path / "run.yaml", model={"vision": "models/clip/vit", "llm": str(tmp_path / "no-llm")},
                       data={"train": [str(tmp_path / "train.jsnl"), str(tmp_path / "empty.jsonl")]},
                       output={"dir": str(tmp_path / "a-file")})
    (tmp_path / "train.jsonl").write_text(color_data.read_text())
    assert main(["train", cfg, "data.skip_bad=true"]) == 2
    out = capsys.readouterr().out
    assert "5 problem(s) with the files the config names" in out
    assert f"`data.train`: {tmp_path / 'train.jsnl'} does not exist (a JSON or JSON Lines data file); did you mean " \
           f"{tmp_path / 'train.jsonl'}?" in out
    assert f"`data.train`: {tmp_path / 'empty.jsonl'} is empty" in out
    assert "`model.vision`: models/clip/vit does not exist (a vision encoder folder; vlmtune reads local folders" in out
    assert f"`model.llm`: {tmp_path / 'no-llm'} does not exist" in out
    assert f"`output.dir`: {tmp_path / 'a-file'} is a file, not a folder" in out
    assert "Repo id" not in out and "bad sample" not in out


def test_a_plain_llm_as_model_path_says_where_it_goes(parts, color_data, tmp_path, capsys):
    cfg = write_config(tmp_path / "run.yaml", model={"path": str(parts["llm"])}, data={"train": str(color_data)},
                       output={"dir": str(tmp_path / "out")})
    assert main(["train", cfg]) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert "model type 'llama' is not a family vlmtune knows" in out and "XTuner pth_to_hf folder" in out
    assert "give it as `model.llm` together with a vision encoder folder as `model.vision`" in out


def test_lora_target_matching_no_layer_is_named(tiny_vlm, color_data, tmp_path, capsys):
    cfg = write_config(tmp_path / "run.yaml", model={"path": str(tiny_vlm)}, data={"train": str(color_data)},
                       tune={"llm": "lora", "lora": {"targets": {"llm": ["q_proj", "qproj"]}}},
                       train={"max_steps": 1, "save_steps": 0}, output={"dir": str(tmp_path / "out")})
    assert main(["train", cfg]) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert "`tune.lora.targets.llm`: qproj match(es) no layer of the llm; its linear layers are named: down_proj, " \
           "gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj" in out


def test_error_text_is_not_eaten_as_markup(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    cfg = write_config(tmp_path / "run.yaml", model={"path": "m"}, data={"train": "t.jsonl"}, output={"dir": "o"})
    assert main(["train", cfg, "train.tensorboard=true"]) == 2
    assert "pip install 'vlmtune[tensorboard]'" in capsys.readouterr().out


def test_skip_bad_lists_every_skipped_sample_and_broken_images_never_reach_training(tiny_vlm, tmp_path, capsys):
    records = color_records(tmp_path, n=16)
    truncated_jpeg(tmp_path / "images" / "cut.jpg")
    for record in records[:12]:
        record["image"] = "images/cut.jpg"
    data = write_jsonl(tmp_path / "d.jsonl", records)
    cfg = write_config(tmp_path / "run.yaml", model={"path": str(tiny_vlm)}, data={"train": str(data)},
                       train={"max_steps": 2, "batch_size": 2, "save_steps": 0}, output={"dir": str(tmp_path / "out")})
    assert main(["train", cfg]) == 1
    assert "image file is truncated" in capsys.readouterr().out and not (tmp_path / "out").exists()
    assert main(["train", cfg, "data.skip_bad=true"]) == 0
    out = capsys.readouterr().out
    assert f"skipped 12 bad sample(s) (data.skip_bad=true; every one is listed in {tmp_path / 'out' / 'skipped_samples.jsonl'})" in out
    listed = [json.loads(line) for line in (tmp_path / "out" / "skipped_samples.jsonl").read_text().splitlines()]
    assert [r["id"] for r in listed] == [f"s{i}" for i in range(12)] and {r["split"] for r in listed} == {"train"}
    assert listed[0]["where"] == "d.jsonl line 1" and "image file is truncated" in listed[0]["problem"]
    manifest = json.loads((tmp_path / "out" / "vlmtune.json").read_text())
    assert manifest["data"]["skipped"] == 12 and manifest["data"]["skipped_list"] == "skipped_samples.jsonl"

    results = tmp_path / "results.jsonl"
    assert main(["eval", str(tiny_vlm), "--data", str(data), "--out", str(results), "--max-new-tokens", "2"]) == 0
    printed = capsys.readouterr()
    assert "/4; 12 skipped); per-sample results:" in printed.out
    assert "generating: 100%" in printed.err and "4/4" in printed.err  # progress, on stderr
    assert len(results.read_text().splitlines()) == 4


def test_pixel_limit_refuses_or_downscales_in_a_run(tiny_vlm, tmp_path, capsys):
    records = color_records(tmp_path, n=4)
    make_image(tmp_path / "images" / "big.png", "blue", size=40)
    records[0]["image"] = "images/big.png"
    data = write_jsonl(tmp_path / "d.jsonl", records)
    cfg = write_config(tmp_path / "run.yaml", model={"path": str(tiny_vlm)}, data={"train": str(data), "max_image_pixels": 400},
                       train={"max_steps": 1, "batch_size": 4, "save_steps": 0}, output={"dir": str(tmp_path / "out")})
    assert main(["train", cfg]) == 1
    assert "d.jsonl line 1 (id s0): image" in capsys.readouterr().out
    assert main(["train", cfg, "data.downscale_large_images=true"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "[train] samples with images over data.max_image_pixels, downscaled as they load: 1" in out
    assert "(40x40) is downscaled to data.max_image_pixels=400 as it loads" in out
