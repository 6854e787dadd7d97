"""Images through the processor's own protocol (transformers' `replace_image_token`).

The processor decides what text an image becomes (`<image>` x N for LLaVA; Qwen's pads; Idefics3's
tiles with row/column markers and a global image) and what pixel inputs go with it. vlmtune asks
it both, so the ids it trains on are the ids the processor produces; `image_block` gives the text
for an image of a given size without decoding the image (a blank image of that size is processed
once per size), and `image_inputs` checks, when the real image is processed, that its block is the
one the sample was encoded with.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image


class ImageBlockMismatch(ValueError):
    """The processor gave an image another token block than the sample was encoded with."""


def image_token(processor) -> str:
    token = getattr(processor, "image_token", None)
    if token is None:
        raise ValueError(f"{type(processor).__name__} has no image token; it is not a vision-language processor")
    return token


def image_token_id(processor) -> int:
    token_id = getattr(processor, "image_token_id", None)
    return token_id if token_id is not None else processor.tokenizer.convert_tokens_to_ids(image_token(processor))


def placeholder_ids(processor) -> list[int]:
    """Image and video placeholder ids: a model must never generate them (they would ask for pixels
    that do not exist on the next step)."""
    ids = {image_token_id(processor), getattr(processor, "video_token_id", None)}
    return sorted(i for i in ids if isinstance(i, int))


def _images_kwargs(processor) -> dict[str, Any]:
    """The processor's image arguments, merged once per processor (a third of processing a small
    image, done for every image of every step otherwise); a copy, in case the processor edits it."""
    cache = processor.__dict__
    if "_vlmtune_images_kwargs" not in cache:
        init = processor.tokenizer.init_kwargs if hasattr(processor, "tokenizer") else {}
        cache["_vlmtune_images_kwargs"] = processor._merge_kwargs(tokenizer_init_kwargs=init,
                                                                  return_tensors="pt")["images_kwargs"]
    return dict(cache["_vlmtune_images_kwargs"])


def process(processor, images: list[Image.Image]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(model inputs, block text per image) exactly as `processor(text=..., images=...)` computes them."""
    processed, blocks = processor._process_images(images, **_images_kwargs(processor))
    wanted = getattr(processor.image_processor, "model_input_names", None) or list(processed)
    unused = set(getattr(processor, "unused_input_names", ()))  # e.g. Idefics3's rows / cols
    tensors = {k: v if isinstance(v, torch.Tensor) else torch.as_tensor(v) for k, v in dict(processed).items()
               if k in wanted and k not in unused}
    return tensors, blocks


def number_blocks(processor, text: str, blocks: list[str]) -> list[str]:
    """Blocks as they stand in the text: processors that number a sample's images (MiniCPM-V 4.6's
    `<image_id>0</image_id>`) prefix each block with its index."""
    if hasattr(processor, "_prepend_local_ids") and getattr(processor, "default_use_image_id", False):
        return processor._prepend_local_ids([text], blocks, image_token(processor))
    return blocks


def image_block(processor, size: tuple[int, int]) -> str:
    """The text an image of `size` (width, height) becomes; cached per processor and size."""
    cache = processor.__dict__.setdefault("_vlmtune_blocks", {})  # lives and dies with the processor
    if size not in cache:
        cache[size] = process(processor, [Image.new("RGB", tuple(size))])[1][0]
    return cache[size]


def image_inputs(processor, images: list[Image.Image], expected_blocks: list[str] | None = None,
                 label: str = "sample") -> dict[str, torch.Tensor]:
    """Pixel inputs for one sample's images; with `expected_blocks`, the processor must agree."""
    tensors, blocks = process(processor, images)
    if expected_blocks is not None:
        for index, (got, want) in enumerate(zip(blocks, expected_blocks)):
            if got != want:
                raise ImageBlockMismatch(
                    f"{label}: image {index} takes {got.count(image_token(processor))} placeholder token(s) when "
                    f"processed but was encoded with {want.count(image_token(processor))}; the image changed on disk "
                    "after the data check, or the processor depends on more than its size")
    return tensors
