"""Position ids for packed rows: every sample counts from 0, so transformers' masking sees where
samples start and lets no token attend across them (SDPA / eager build the block-diagonal mask,
flash-attention takes the same positions as variable-length sequences)."""

from __future__ import annotations

import torch

from vlmtune.models.family import Family
from vlmtune.models.segments import segment_kwargs, uses_segments

PACK_KEYS = ("pack_lengths", "pack_images")  # [rows, segments] each; the padding tail is its own segment


def packed_inputs(model, family: Family, batch: dict) -> dict:
    """A packed batch as the model takes it: per-sample positions instead of the packing keys, and
    where each sample starts for attention that works per sample (`vlmtune.models.segments`)."""
    inputs = {k: v for k, v in batch.items() if k not in PACK_KEYS}
    inputs["position_ids"] = packed_position_ids(model, family, batch)
    if uses_segments(model):
        inputs.update(segment_kwargs(batch["pack_lengths"], batch["input_ids"].device))
    inputs["use_cache"] = False  # transformers reads packed positions only when there is no cache
    return inputs


def packed_position_ids(model, family: Family, batch: dict) -> torch.Tensor:
    """[rows, seq] positions, or for a family with its own (multi-row) positions [1 + R, rows, seq]:
    the text positions first, as transformers expects of packed multimodal-rope inputs, then the
    family's R rows computed per sample."""
    lengths, images = batch["pack_lengths"].tolist(), batch["pack_images"].tolist()
    text = torch.stack([torch.cat([torch.arange(n) for n in row if n]) for row in lengths])  # [rows, seq]
    text = text.to(batch["input_ids"].device)
    if family.position_ids is None:
        return text
    token_keys = ("input_ids", *family.token_type_keys)
    total = sum(map(sum, images))
    per_image = {k: v for k, v in batch.items() if torch.is_tensor(v) and k not in token_keys and k not in
                 ("pack_lengths", "pack_images", "labels") and v.ndim and v.shape[0] == total and total}
    rows, offset = [], 0
    for r, (sizes, counts) in enumerate(zip(lengths, images)):
        parts, start = [], 0
        for n, k in zip(sizes, counts):
            if not n:
                continue
            sample = {key: batch[key][r: r + 1, start: start + n] for key in token_keys if key in batch}
            sample["attention_mask"] = torch.ones_like(sample["input_ids"])
            if k:
                sample.update({key: v[offset: offset + k] for key, v in per_image.items()})
            parts.append(family.position_ids(model, sample))  # [R, 1, n]
            start, offset = start + n, offset + k
        rows.append(torch.cat(parts, dim=-1))
    return torch.cat([text[None], torch.cat(rows, dim=1).to(text.device)])  # [1 + R, rows, seq]
