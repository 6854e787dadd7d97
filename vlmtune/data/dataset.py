"""Encoded samples as a torch dataset (images load lazily, per item) and the batch collator."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils.data import Dataset

from vlmtune.data.encode import IGNORE, EncodedSample, Prompt
from vlmtune.data.images import load_image
from vlmtune.models import images as mm
from vlmtune.models.family import Family


def collator_for(family: Family, pad_token_id: int, padding_side: str = "right") -> "Collator":
    return Collator(pad_token_id, padding_side, family.token_type_keys, dict(family.concat_dims))

TEXT_KEYS = ("input_ids", "labels", "attention_mask")


class ConversationDataset(Dataset):
    """Training items: `input_ids`, `labels`, per-token extras and the processor's image inputs.

    Image inputs are made once per sample and kept while they fit `cache_bytes` (first come, kept:
    with more images than fit, the first ones stay cached and the rest are made each epoch, rather
    than every one being evicted before its turn comes again)."""

    def __init__(self, items: list[EncodedSample] | list[Prompt], processor, family: Family,
                 max_image_pixels: int | None = None, cache_bytes: int = 0):
        self.items = items
        self.processor = processor
        self.family = family
        self.max_image_pixels = max_image_pixels  # larger images are downscaled to this when they load
        self.cache_bytes = cache_bytes
        self.cache: dict[int, dict[str, torch.Tensor]] = {}
        self.cached_bytes = 0

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = self.items[index]
        out = {"input_ids": torch.tensor(item.input_ids)}
        if isinstance(item, EncodedSample):
            out["labels"] = torch.tensor(item.labels)
        out.update({key: torch.tensor(values) for key, values in item.extra.items()})
        if item.images:
            out.update(self.image_inputs(index, item))
        return out

    def image_inputs(self, index: int, item) -> dict[str, torch.Tensor]:
        if index in self.cache:
            return self.cache[index]
        images = [load_image(path, item.sample.label(), self.max_image_pixels) for path in item.images]
        inputs = mm.image_inputs(self.processor, images, item.blocks, item.sample.label())
        size = sum(v.numel() * v.element_size() for v in inputs.values() if torch.is_tensor(v))
        if self.cached_bytes + size <= self.cache_bytes:
            self.cache[index] = inputs
            self.cached_bytes += size
        return inputs


@dataclass
class Collator:
    """Pads text (and per-token extras) to the longest item; image inputs of the batch are
    concatenated along dim 0, zero-padded first where their other dims differ (LLaVA-NeXT's tile
    counts, Idefics3's images per sample) — a zero image is padding to the models that need it."""

    pad_token_id: int
    padding_side: str = "right"  # "left" for generation
    token_keys: tuple[str, ...] = field(default_factory=tuple)  # per-token inputs, padded with 0
    concat_dims: dict[str, int] = field(default_factory=dict)  # image inputs joined along another dim than 0

    def __call__(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        longest = max(len(item["input_ids"]) for item in items)
        batch: dict[str, torch.Tensor] = {
            "input_ids": self._pad([i["input_ids"] for i in items], longest, self.pad_token_id),
            "attention_mask": self._pad([torch.ones_like(i["input_ids"]) for i in items], longest, 0),
        }
        if "labels" in items[0]:
            batch["labels"] = self._pad([i["labels"] for i in items], longest, IGNORE)
        for key in self.token_keys:
            if key in items[0]:
                batch[key] = self._pad([i[key] for i in items], longest, 0)
        batch.update(self.image_inputs(items))
        return batch

    def image_inputs(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The items' image inputs joined in item order."""
        batch = {}
        image_keys = sorted({k for item in items for k in item if k not in TEXT_KEYS and k not in self.token_keys})
        for key in image_keys:
            tensors = [item[key] for item in items if key in item]
            dim = self.concat_dims.get(key)
            batch[key] = torch.cat(tensors, dim) if dim is not None else concat_padded(tensors)  # [images, ...]
        return batch

    def _pad(self, rows: list[torch.Tensor], length: int, value: int) -> torch.Tensor:
        out = torch.full((len(rows), length), value, dtype=rows[0].dtype)
        for i, row in enumerate(rows):
            if self.padding_side == "right":
                out[i, : len(row)] = row
            else:
                out[i, length - len(row):] = row
        return out


def concat_padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate on dim 0 after zero-padding every other dim to the largest size."""
    if len({t.shape[1:] for t in tensors}) == 1:
        return torch.cat(tensors)
    shape = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].ndim)]
    out = []
    for t in tensors:
        padded = t.new_zeros((t.shape[0], *shape))
        padded[(slice(None), *(slice(0, s) for s in t.shape[1:]))] = t
        out.append(padded)
    return torch.cat(out)
