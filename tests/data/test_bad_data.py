"""Bad data that used to crash `data check` or a run: each is a named problem of its own sample, and the
rest of the file is still read."""

import json

from conftest import make_image, png_header, truncated_jpeg, write_jsonl
from PIL import Image

from vlmtune.data.check import check_data
from vlmtune.data.images import image_problem, load_image


def sample(i, image=None, **extra):
    record = {"id": f"s{i}", "conversations": [{"from": "human", "value": ("<image>\n" if image else "") + "Color?"},
                                               {"from": "gpt", "value": "red"}], **extra}
    if image:
        record["image"] = image
    return record


def problems_of(report):
    found = {}
    for p in report.problems:
        found[p.sample_id] = f"{found[p.sample_id]}; {p.message}" if p.sample_id in found else p.message
    return found


def test_truncated_jpeg_is_caught_by_the_check(tmp_path):
    jpeg = truncated_jpeg(tmp_path / "cut.jpg")
    with Image.open(jpeg) as image:
        assert image.size == (64, 64)  # it opens: only decoding finds the damage
    make_image(tmp_path / "ok.png")
    report = check_data([str(write_jsonl(tmp_path / "d.jsonl", [sample(0, "cut.jpg"), sample(1, "ok.png")]))])
    assert len(report.samples) == 1 and report.bad == 1
    assert problems_of(report)["s0"].startswith(f"image {jpeg} cannot be read: image file is truncated")


def test_images_over_the_pixel_limit_are_refused_or_downscaled(tmp_path):
    huge, big = png_header(tmp_path / "huge.png", 20000, 20000), png_header(tmp_path / "big.png", 12000, 12000)
    report = check_data([str(write_jsonl(tmp_path / "d.jsonl", [sample(0, "huge.png"), sample(1, "big.png")]))])
    found = problems_of(report)
    assert found["s0"].startswith(f"image {huge} is too large to open safely: Image size (400000000 pixels) exceeds limit")
    assert found["s1"] == (f"image {big} is 12000x12000 = 144000000 pixels, more than data.max_image_pixels=16777216; "
                           "downscale it, raise the limit or set data.downscale_large_images=true")
    make_image(tmp_path / "a.png", size=40)
    assert image_problem(tmp_path / "a.png", max_pixels=400) == (
        f"image {tmp_path / 'a.png'} is 40x40 = 1600 pixels, more than data.max_image_pixels=400; "
        "downscale it, raise the limit or set data.downscale_large_images=true")
    assert image_problem(tmp_path / "a.png", max_pixels=400, downscale=True) is None
    make_image(tmp_path / "b.png", size=24)
    report = check_data([str(write_jsonl(tmp_path / "e.jsonl", [sample(0, "a.png"), sample(1, "b.png")]))],
                        max_pixels=400, downscale=True)
    assert [s.id for s in report.samples] == ["s0", "s1"] and report.problems == []
    assert report.summary()[3:] == [
        "samples with images over data.max_image_pixels, downscaled as they load: 2",
        f"  - e.jsonl line 1 (id s0): image {tmp_path / 'a.png'} (40x40) is downscaled to data.max_image_pixels=400 as it loads",
        f"  - e.jsonl line 2 (id s1): image {tmp_path / 'b.png'} (24x24) is downscaled to data.max_image_pixels=400 as it loads"]
    assert load_image(tmp_path / "a.png", "test", max_pixels=400).size == (20, 20)
    assert load_image(tmp_path / "a.png", "test").size == (40, 40)


def test_bad_paths_and_bad_turns_are_problems_not_crashes(tmp_path):
    make_image(tmp_path / "ok.png")
    records = [sample(0, "x" * 300 + ".png"), sample(1, "a\x00b.png"),
               {"id": "s2", "conversations": [1, 2]}, {"id": "s3", "messages": [None]},
               {"id": "s4", "messages": [{"role": "user", "content": "hi"}, "yes"]}, sample(5, "ok.png")]
    report = check_data([str(write_jsonl(tmp_path / "d.jsonl", records))])
    found = problems_of(report)
    assert [s.id for s in report.samples] == ["s5"]
    assert found["s0"] == f"image path {str(tmp_path / ('x' * 300))[:80]}... cannot be used: File name too long"
    assert found["s1"] == f"image {tmp_path / 'a'}\x00b.png does not exist"
    assert found["s2"] == "turn 0 is not an object (got 1); turn 1 is not an object (got 2)" and found["s3"] == "turn 0 is not an object (got null)"
    assert found["s4"] == 'turn 1 is not an object (got "yes")'


def test_invalid_utf8_is_named_by_line_or_record(tmp_path):
    good = (json.dumps(sample(0)) + "\n").encode()
    padding = good * (5000 // len(good) + 1)  # past the first 4 KiB
    lines = tmp_path / "late.jsonl"
    bad = b'{"id": "bad", "conversations": [{"from": "human", "value": "caf\xe9"}]}\n'
    lines.write_bytes(padding + bad + good)
    report = check_data([str(lines)])
    late, column = padding.count(b"\n") + 1, bad.index(0xE9) + 1
    assert [str(p) for p in report.problems] == [f"late.jsonl line {late}: byte 0xe9 at column {column} "
                                                 "is not valid UTF-8; re-save the file as UTF-8"]
    assert report.records == late + 1 and len(report.samples) == late

    early = tmp_path / "early.jsonl"
    early.write_bytes(b'{"id": "\xff"}\n' + good + good)
    report = check_data([str(early)])
    assert [str(p) for p in report.problems] == ["early.jsonl line 1: byte 0xff at column 9 is not valid UTF-8; "
                                                 "re-save the file as UTF-8"]
    assert len(report.samples) == 2

    array = tmp_path / "array.json"
    array.write_bytes(b"[" + json.dumps(sample(0)).encode() + b',\n{"id": "x\xe9", "conversations": []}, '
                      + json.dumps(sample(2)).encode() + b"]")
    report = check_data([str(array)])
    assert [str(p) for p in report.problems] == ["array.json record 1: not valid UTF-8; re-save the file as UTF-8"]
    assert [s.id for s in report.samples] == ["s0", "s2"]


def test_missing_and_empty_files_are_not_samples(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    report = check_data([str(tmp_path / "nope.jsonl"), str(tmp_path / "empty.jsonl")])
    assert report.records == 0 and report.bad == 0
    assert [str(p) for p in report.problems] == [f"{tmp_path / 'nope.jsonl'}: data file does not exist",
                                                 f"{tmp_path / 'empty.jsonl'}: the file holds no records"]
