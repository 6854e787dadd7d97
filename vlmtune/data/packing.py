"""Packed rows (`data.packing`, `data.padding_free`): several encoded samples per row, so a batch carries
no padding.

Samples are placed whole (first fit, longest first) into rows of at most `data.max_length` tokens, or
(`data.padding_free`) each batch's samples make its one row; truncation happened before, at encoding,
with its usual rules. A row keeps its samples' images in order and says where each sample starts
(`pack_lengths`) and how many images it has (`pack_images`); the training step turns that into
per-sample positions, from which transformers builds attention that never crosses samples. The first
label of every sample is ignored, so no token learns to predict the next sample: the loss equals that
of the samples run one by one."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from vlmtune.data.encode import IGNORE


def pack_groups(lengths: list[int], max_length: int) -> list[list[int]]:
    """Sample indices per row: first fit in decreasing length, each row's samples in their data order."""
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if lengths[index] > max_length:
            raise ValueError(f"sample {index} has {lengths[index]} tokens, more than data.max_length={max_length}")
        row = next((r for r, free in enumerate(room) if free >= lengths[index]), None)
        if row is None:
            rows.append([])
            room.append(max_length)
            row = len(rows) - 1
        rows[row].append(index)
        room[row] -= lengths[index]
    return [sorted(row) for row in rows]


class PackedDataset(Dataset):
    """Rows of whole samples from a `ConversationDataset`; images load per sample, as before. Without
    `max_length` every sample is a row of its own, which `PackedRows(one_row=True)` joins per batch
    (`data.padding_free`): the sampler, and so the batches, stay those of unpacked training."""

    def __init__(self, dataset, max_length: int | None):
        self.dataset = dataset
        self.lengths = [len(item.input_ids) for item in dataset.items]
        self.groups = pack_groups(self.lengths, max_length) if max_length else [[i] for i in range(len(self.lengths))]

    def __len__(self) -> int:
        return len(self.groups)

    def row_lengths(self) -> list[int]:
        return [sum(self.lengths[i] for i in group) for group in self.groups]

    def __getitem__(self, index: int) -> dict:
        group = self.groups[index]
        return {"samples": [self.dataset[i] for i in group],
                "images": [len(self.dataset.items[i].images) for i in group]}


@dataclass
class PackedRows:
    """Joins each row's samples end to end, then pads rows to the longest (the tail is a segment of its
    own, with positions from 0 and no labels). No attention mask: positions say where samples start."""

    collator: object  # the unpacked `Collator`: its pad id, per-token keys and image concatenation
    one_row: bool = False  # `data.padding_free`: the batch's rows (one sample each) joined into one

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        c = self.collator
        if "samples" not in rows[0]:  # evaluation data is not packed
            return c(rows)
        if self.one_row:
            rows = [{key: [x for row in rows for x in row[key]] for key in ("samples", "images")}]
        joined = [self._join(row) for row in rows]
        longest = max(len(r["input_ids"]) for r in joined)
        batch = {"input_ids": c._pad([r["input_ids"] for r in joined], longest, c.pad_token_id)}
        if "labels" in joined[0]:
            batch["labels"] = c._pad([r["labels"] for r in joined], longest, IGNORE)
        for key in c.token_keys:
            if key in joined[0]:
                batch[key] = c._pad([r[key] for r in joined], longest, 0)
        segments = max(len(row["samples"]) for row in rows) + 1
        lengths = torch.zeros(len(rows), segments, dtype=torch.long)
        images = torch.zeros(len(rows), segments, dtype=torch.long)
        for r, row in enumerate(rows):
            sizes = [len(s["input_ids"]) for s in row["samples"]]
            lengths[r, : len(sizes) + 1] = torch.tensor(sizes + [longest - sum(sizes)])
            images[r, : len(sizes)] = torch.tensor(row["images"])
        batch["pack_lengths"], batch["pack_images"] = lengths, images
        batch.update(c.image_inputs([sample for row in rows for sample in row["samples"]]))
        return batch

    def _join(self, row: dict) -> dict[str, torch.Tensor]:
        samples = row["samples"]
        out = {key: torch.cat([s[key] for s in samples]) for key in ("input_ids", *self.collator.token_keys)
               if key in samples[0]}
        if "labels" in samples[0]:
            labels = [s["labels"].clone() for s in samples]
            for part in labels:
                part[0] = IGNORE  # the previous sample's last token must not learn to predict this one
            out["labels"] = torch.cat(labels)
        return out
