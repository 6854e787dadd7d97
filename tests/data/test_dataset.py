"""Batches: right padding for training, left for generation, image inputs of the batch concatenated."""

import torch

from vlmtune.data.dataset import Collator
from vlmtune.data.encode import IGNORE


def item(ids, images=0):
    out = {"input_ids": torch.tensor(ids), "labels": torch.tensor(ids)}
    if images:
        out["pixel_values"] = torch.ones(images, 3, 4, 4)
    return out


def test_training_batch_mixes_text_only_and_image_samples():
    batch = Collator(pad_token_id=0)([item([5, 6, 7], images=2), item([8]), item([9, 9], images=1)])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0], [9, 9, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7], [8, IGNORE, IGNORE], [9, 9, IGNORE]]
    assert batch["pixel_values"].shape == (3, 3, 4, 4)  # [images in batch, channels, height, width]


def test_generation_batch_is_left_padded_and_text_only_has_no_pixels():
    batch = Collator(pad_token_id=0, padding_side="left")([{"input_ids": torch.tensor([1, 2])}, {"input_ids": torch.tensor([3])}])
    assert batch["input_ids"].tolist() == [[1, 2], [0, 3]] and batch["attention_mask"].tolist() == [[1, 1], [0, 1]]
    assert set(batch) == {"input_ids", "attention_mask"}


def test_image_inputs_are_made_once_per_sample_while_they_fit(tiny_vlm, tmp_path, monkeypatch):
    """`data.image_cache_mb`: a later epoch reads the kept inputs (no decode, no processor call) and
    gets the very same tensors; samples past the budget are made again each time, equal."""
    from conftest import make_image, write_jsonl

    from vlmtune.checkpoints.load import load_model
    from vlmtune.data import dataset as dataset_module
    from vlmtune.data.check import check_data, encode_checked
    from vlmtune.data.dataset import ConversationDataset
    from vlmtune.data.encode import SampleEncoder

    records = []
    for i, color in enumerate(["red", "blue", "green"]):
        make_image(tmp_path / f"{i}.png", color)
        records.append({"id": str(i), "images": [f"{i}.png"], "messages": [
            {"role": "user", "content": "<image>What color?"}, {"role": "assistant", "content": color}]})
    report = check_data([str(write_jsonl(tmp_path / "train.jsonl", records))])
    loaded = load_model(tiny_vlm)
    encode_checked(report, SampleEncoder(loaded.processor, loaded.family, 256))
    calls = []
    real = dataset_module.mm.image_inputs
    monkeypatch.setattr(dataset_module.mm, "image_inputs", lambda *a, **k: calls.append(1) or real(*a, **k))

    one_sample = ConversationDataset(report.encoded, loaded.processor, loaded.family)[0]["pixel_values"]
    budget = one_sample.numel() * one_sample.element_size() * 2  # room for two samples' inputs
    calls.clear()
    dataset = ConversationDataset(report.encoded, loaded.processor, loaded.family, cache_bytes=budget)
    first = [dataset[i]["pixel_values"] for i in range(3)]
    assert len(calls) == 3 and sorted(dataset.cache) == [0, 1] and dataset.cached_bytes == budget
    second = [dataset[i]["pixel_values"] for i in range(3)]
    assert len(calls) == 4  # only the third sample, which did not fit, was made again
    assert second[0] is first[0] and second[1] is first[1] and torch.equal(second[2], first[2])
    calls.clear()
    uncached = ConversationDataset(report.encoded, loaded.processor, loaded.family)
    assert all(torch.equal(uncached[i]["pixel_values"], first[i]) for i in range(3)) and len(calls) == 3
