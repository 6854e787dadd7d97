"""Encoded samples as a torch dataset (images load lazily, per item) and the batch collator."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from vlmtune.data.encode import IGNORE, EncodedSample, Prompt
from vlmtune.data.images import load_image
from vlmtune.models.registry import Family

TEXT_KEYS = ("input_ids", "labels", "attention_mask")


class ConversationDataset(Dataset):
    """Training items: `input_ids`, `labels` and the family's image inputs (e.g. `pixel_values`)."""

    def __init__(self, items: list[EncodedSample] | list[Prompt], processor, family: Family,
                 max_image_pixels: int | None = None):
        self.items = items
        self.processor = processor
        self.family = family
        self.max_image_pixels = max_image_pixels  # larger images are downscaled to this when they load

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = self.items[index]
        out = {"input_ids": torch.tensor(item.input_ids)}
        if isinstance(item, EncodedSample):
            out["labels"] = torch.tensor(item.labels)
        if item.images:
            images = [load_image(path, item.sample.label(), self.max_image_pixels) for path in item.images]
            out.update(self.family.image_inputs(self.processor, images))
        return out


@dataclass
class Collator:
    """Pads text to the longest item; concatenates image inputs of the batch along dim 0."""

    pad_token_id: int
    padding_side: str = "right"  # "left" for generation

    def __call__(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        longest = max(len(item["input_ids"]) for item in items)
        batch: dict[str, torch.Tensor] = {
            "input_ids": self._pad([i["input_ids"] for i in items], longest, self.pad_token_id),
            "attention_mask": self._pad([torch.ones_like(i["input_ids"]) for i in items], longest, 0),
        }
        if "labels" in items[0]:
            batch["labels"] = self._pad([i["labels"] for i in items], longest, IGNORE)
        for key in {k for item in items for k in item if k not in TEXT_KEYS}:
            batch[key] = torch.cat([item[key] for item in items if key in item])  # [images in batch, ...]
        return batch

    def _pad(self, rows: list[torch.Tensor], length: int, value: int) -> torch.Tensor:
        out = torch.full((len(rows), length), value, dtype=rows[0].dtype)
        for i, row in enumerate(rows):
            if self.padding_side == "right":
                out[i, : len(row)] = row
            else:
                out[i, length - len(row):] = row
        return out
