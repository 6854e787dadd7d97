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
