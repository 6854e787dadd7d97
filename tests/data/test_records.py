"""Every data format parses to the same canonical sample; every problem names its sample."""

import json

from conftest import make_image, write_jsonl

from vlmtune.data.check import check_data
from vlmtune.data.records import read_samples


def parts_of(sample):
    return [[p["type"] if p["type"] == "image" else p["text"] for p in m.parts] for m in sample.messages]


def test_llava_format_multi_turn_and_multi_image(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"id": 7, "image": ["a.png", "b.png"], "conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "<image>\n<image>\nSame?"}, {"from": "gpt", "value": "No."},
        {"from": "human", "value": "Why?"}, {"from": "gpt", "value": "Colours."}]}])
    samples, problems = read_samples(tmp_path / "d.jsonl")
    assert problems == []
    (s,) = samples
    assert s.id == "7"
    assert [m.role for m in s.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert parts_of(s)[1] == ["image", "\n", "image", "\nSame?"]
    assert s.images == [tmp_path / "a.png", tmp_path / "b.png"]


def test_minicpm_formats(tmp_path):
    records = [
        {"id": "0", "image": "x.png", "conversations": [
            {"role": "user", "content": "How many?"}, {"role": "assistant", "content": "Three."}]},
        {"id": "1", "image": {"<image_00>": "a.png", "<image_01>": "b.png"}, "conversations": [
            {"role": "user", "content": "Compare <image_01> with <image_00>."}, {"role": "assistant", "content": "Same."}]},
    ]
    samples, problems = read_samples(write_jsonl(tmp_path / "d.jsonl", records))
    assert problems == []
    untagged, mapped = samples
    assert parts_of(untagged)[0] == ["image", "How many?"]  # an untagged single image opens the first user turn
    assert mapped.images == [tmp_path / "b.png", tmp_path / "a.png"]  # in order of appearance
    assert parts_of(mapped)[0] == ["Compare ", "image", " with ", "image", "."]


def test_sharegpt_and_content_parts(tmp_path):
    records = [
        {"messages": [{"role": "system", "content": "Helpful."}, {"role": "user", "content": "<image>Who?"},
                      {"role": "assistant", "content": "Kane.", "loss": False}, {"role": "user", "content": "Sure?"},
                      {"role": "assistant", "content": "Yes."}], "images": ["p.jpg"]},
        {"messages": [{"role": "user", "content": [{"type": "image", "image": "cat.png"}, {"type": "text", "text": "What?"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}]},
        {"messages": [{"role": "user", "content": "Text only."}, {"role": "assistant", "content": "Fine."}]},
    ]
    samples, problems = read_samples(write_jsonl(tmp_path / "d.jsonl", records), images_root=tmp_path / "media")
    assert problems == []
    share, parts, text_only = samples
    assert [m.train for m in share.messages if m.role == "assistant"] == [False, True]
    assert share.images == [tmp_path / "media" / "p.jpg"]
    assert parts_of(parts)[0] == ["image", "What?"] and parts.images == [tmp_path / "media" / "cat.png"]
    assert text_only.images == [] and share.id == "line 1"


def test_json_array_files(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps([{"conversations": [
        {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}]))
    samples, problems = read_samples(tmp_path / "d.json")
    assert problems == [] and samples[0].where == "d.json record 0"


def test_every_problem_is_named(tmp_path):
    make_image(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_text("not an image")
    lines = [
        json.dumps({"id": "a", "image": "ok.png", "conversations": [{"from": "human", "value": "<image> hi"}, {"from": "gpt", "value": "yo"}]}),
        '{"id": "broken", "conversations": [',
        json.dumps({"id": "b", "image": "missing.png", "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}]}),
        json.dumps({"id": "c", "image": "bad.png", "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}]}),
        json.dumps({"id": "d", "image": "ok.png", "conversations": [{"from": "human", "value": "no tag"}, {"from": "gpt", "value": "x"}]}),
        json.dumps({"id": "e", "conversations": [{"from": "robot", "value": "beep"}, {"from": "gpt", "value": "x"}]}),
        json.dumps({"id": "f", "conversations": []}),
        json.dumps({"id": "g", "conversations": [{"from": "human", "value": "only a question"}]}),
        json.dumps({"id": "h", "stuff": 1}),
    ]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    report = check_data([str(tmp_path / "d.jsonl")])
    messages = [str(p) for p in report.problems]
    assert len(report.samples) == 1 and report.records == 9
    expected = [
        ("d.jsonl line 2", "broken JSON"),
        ("d.jsonl line 3 (id b)", "missing.png does not exist"),
        ("d.jsonl line 4 (id c)", "cannot be read"),
        ("d.jsonl line 5 (id d)", "0 image tag(s) in the text but 1 image(s) given"),
        ("d.jsonl line 6 (id e)", "unknown role 'robot'"),
        ("d.jsonl line 7 (id f)", "empty conversation"),
        ("d.jsonl line 8 (id g)", "no assistant turn"),
        ("d.jsonl line 9 (id h)", "not a known format"),
    ]
    assert len(messages) == len(expected)
    for (where, what), message in zip(expected, messages):
        assert message.startswith(where) and what in message, message
