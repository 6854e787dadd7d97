"""Turn a `Sample` into token ids and labels exactly as the model's own processor would.

The conversation is rendered once with the chat template; each image placeholder is replaced by the
block of text the processor gives an image of that size (`models.images`); the whole text is then
tokenized once, with offsets, and tokens are labelled by the character spans of the trained
assistant turns. Tokenizing pieces separately would not do: a SentencePiece tokenizer gives every
piece its own leading `▁`, so the model would be trained on ids it never sees at inference.
Truncation never cuts through an image's block.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from vlmtune.data.images import fitted_size
from vlmtune.data.records import Sample
from vlmtune.data.templates import TemplateRenderer
from vlmtune.models import images as mm
from vlmtune.models.family import Family

IGNORE = -100


class SampleDropped(ValueError):
    """A sample that cannot be used at this `max_length` (or with this template); the reason says why."""


@dataclass
class EncodedSample:
    sample: Sample
    input_ids: list[int]
    labels: list[int]
    images: list[Path]  # the images whose tokens are in `input_ids`
    full_length: int  # before truncation
    blocks: list[str] = field(default_factory=list)  # each kept image's block text
    block_spans: list[tuple[int, int]] = field(default_factory=list)  # token spans of the kept blocks
    extra: dict[str, list[int]] = field(default_factory=dict)  # per-token inputs (e.g. token_type_ids)

    @property
    def truncated(self) -> bool:
        return self.full_length > len(self.input_ids)


@dataclass
class Prompt:
    """A sample cut before its last assistant turn, for generation; `target` is that turn's text."""

    sample: Sample
    input_ids: list[int]
    images: list[Path]
    target: str
    blocks: list[str] = field(default_factory=list)
    extra: dict[str, list[int]] = field(default_factory=dict)


def image_size(image: Path | Image.Image, max_pixels: int | None = None) -> tuple[int, int]:
    """(width, height) the image loads at, from the file header; the pixels are not decoded."""
    if isinstance(image, Image.Image):
        return image.size
    with Image.open(image) as opened:
        return fitted_size(*opened.size, max_pixels)


class SampleEncoder:
    def __init__(self, processor, family: Family, max_length: int, loss_on: str = "assistant",
                 chat_template: str | None = None, max_image_pixels: int | None = None):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.family = family
        self.max_length = max_length
        self.loss_on = loss_on
        self.max_image_pixels = max_image_pixels  # images larger than this are downscaled as they load
        self.image_token = mm.image_token(processor)
        self.image_token_id = mm.image_token_id(processor)
        self.renderer = TemplateRenderer(processor, chat_template)
        self.wrapper_ids = {self.tokenizer.convert_tokens_to_ids(t) for t in family.image_wrappers}

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.renderer.render(messages, add_generation_prompt)

    def _segments(self, sample: Sample) -> list[tuple[str, bool]]:
        """(text, trained) pieces whose concatenation is the rendered conversation."""
        chat = [m.chat_dict() for m in sample.messages]
        last_assistant = max(i for i, m in enumerate(sample.messages) if m.role == "assistant")
        segments, done = [], ""
        for i, message in enumerate(sample.messages):
            if message.role != "assistant":
                continue
            prompt = self.render(chat[:i], add_generation_prompt=True)
            full = self.render(chat[: i + 1], add_generation_prompt=False)
            if not prompt.startswith(done) or not full.startswith(prompt):
                raise SampleDropped(
                    "the chat template does not render turns as a growing prefix, so assistant turns cannot be "
                    "located for loss masking; use a prefix-stable template (data.chat_template) or `data.loss_on=all`"
                )
            trained = self.loss_on == "all" or (
                message.train and (self.loss_on == "assistant" or i == last_assistant)
            )
            segments += [(prompt[len(done):], self.loss_on == "all"), (full[len(prompt):], trained)]
            done = full
        rest = self.render(chat, add_generation_prompt=False)[len(done):]
        if rest:
            segments.append((rest, self.loss_on == "all"))
        return [(text, trained) for text, trained in segments if text]

    def _expand(self, text: str, images: list, label: str) -> tuple[str, list[str], list[tuple[int, int]], list[int]]:
        """Replace each image placeholder by its block; returns (text, blocks, char spans, shifts).

        `shifts[k]` is how far text after the k-th placeholder moved, for mapping character positions."""
        found = text.count(self.image_token)
        if found != len(images):
            raise SampleDropped(f"{found} image placeholder(s) after applying the chat template, but "
                                f"{len(images)} image(s)")
        blocks = [mm.image_block(self.processor, image_size(image, self.max_image_pixels)) for image in images]
        out, spans, starts, shifts, last, shift = [], [], [], [], 0, 0
        for block in mm.number_blocks(self.processor, text, blocks):
            at = text.index(self.image_token, last)
            out.append(text[last:at])
            spans.append((at + shift, at + shift + len(block)))
            starts.append(at)
            out.append(block)
            shift += len(block) - len(self.image_token)
            shifts.append(shift)
            last = at + len(self.image_token)
        out.append(text[last:])
        return "".join(out), blocks, spans, list(zip(starts, shifts))

    def _tokenize(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """One tokenizer call for the whole text, as the processor makes it (BOS unless the text has it)."""
        bos = self.tokenizer.bos_token
        encoded = self.tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)),
                                 return_offsets_mapping=True)
        return list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]

    def _token_spans(self, offsets, char_spans) -> list[tuple[int, int]]:
        """Token index ranges covering each character span, widened over the family's wrapper tokens."""
        ends = [end for _, end in offsets]
        spans = []
        for start, end in char_spans:
            first = bisect.bisect_right(ends, start)
            last = first
            while last < len(offsets) and offsets[last][0] < end:
                last += 1
            spans.append((first, last))
        return spans

    def _widen(self, ids: list[int], spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
        out = []
        for first, last in spans:
            while first > 0 and ids[first - 1] in self.wrapper_ids:
                first -= 1
            while last < len(ids) and ids[last] in self.wrapper_ids:
                last += 1
            out.append((first, last))
        return out

    def _encode_text(self, segments: list[tuple[str, bool]], images: list, label: str):
        text = "".join(t for t, _ in segments)
        expanded, blocks, block_chars, shifts = self._expand(text, images, label)
        ids, offsets = self._tokenize(expanded)

        def moved(pos: int) -> int:  # a position of the unexpanded text in the expanded one
            return pos + next((s for at, s in reversed(shifts) if at < pos), 0)

        trained_chars, pos = [], 0
        for piece, trained in segments:
            if trained:
                trained_chars.append((moved(pos), moved(pos + len(piece))))
            pos += len(piece)
        labels = [IGNORE] * len(ids)
        for i, (start, end) in enumerate(offsets):
            if end > start and any(a <= end - 1 < b for a, b in trained_chars):
                labels[i] = ids[i]
        spans = self._widen(ids, self._token_spans(offsets, block_chars))
        for first, last in spans:
            labels[first:last] = [IGNORE] * (last - first)
        found = sum(1 for t in ids if t == self.image_token_id)
        expected = sum(block.count(self.image_token) for block in blocks)
        if self.image_token in self.tokenizer.get_vocab() and found < expected:
            raise SampleDropped(f"{label}: {found} image token(s) after tokenization, {expected} expected")
        return ids, labels, blocks, spans

    def extra_inputs(self, ids: list[int]) -> dict[str, list[int]]:
        """Per-token inputs some families need (e.g. Gemma 3's `token_type_ids`: 1 on image tokens)."""
        image_ids = set(getattr(self.processor, "image_token_ids", None) or [self.image_token_id])
        return {key: [1 if t in image_ids else 0 for t in ids] for key in self.family.token_type_keys}

    def encode(self, sample: Sample) -> EncodedSample:
        """Ids and labels for training; raises `SampleDropped` when nothing trainable fits."""
        ids, labels, blocks, spans = self._encode_text(self._segments(sample), sample.images, sample.label())
        if all(label == IGNORE for label in labels):
            raise SampleDropped("no trained tokens: every assistant turn is excluded from the loss")
        full_length = len(ids)
        images = list(sample.images)
        if full_length > self.max_length:
            cut = self.max_length
            kept = [span for span in spans if span[1] <= cut]
            if len(kept) < len(spans):
                cut = min(cut, spans[len(kept)][0])  # never cut through an image block: end before it
            if all(label == IGNORE for label in labels[:cut]):
                first = next((i for i, label in enumerate(labels) if label != IGNORE), None)
                where = f" (the first trained token is at position {first})" if first is not None else ""
                raise SampleDropped(
                    f"{full_length} tokens, and no trained token fits in data.max_length={self.max_length} "
                    f"without cutting an image{where}; raise data.max_length or shorten the sample"
                )
            ids, labels, images, blocks, spans = ids[:cut], labels[:cut], images[: len(kept)], blocks[: len(kept)], kept
        return EncodedSample(sample, ids, labels, images, full_length, blocks, spans, self.extra_inputs(ids))

    def prompt(self, sample: Sample) -> Prompt:
        """The conversation up to its last assistant turn, ready for generation."""
        last = max(i for i, m in enumerate(sample.messages) if m.role == "assistant")
        head = sample.messages[:last]
        images = list(sample.images[: sum(1 for m in head for p in m.parts if p["type"] == "image")])
        ids, blocks = self.generation_ids([m.chat_dict() for m in head], images, sample.label())
        if len(ids) > self.max_length:
            raise SampleDropped(f"the prompt alone has {len(ids)} tokens, more than max_length={self.max_length}")
        return Prompt(sample, ids, images, sample.messages[last].text, blocks, self.extra_inputs(ids))

    def generation_ids(self, chat: list[dict], images: list, label: str = "prompt") -> tuple[list[int], list[str]]:
        """Token ids of `chat` followed by the assistant prompt, image blocks expanded; and the blocks."""
        text = self.render(chat, add_generation_prompt=True)
        ids, _, blocks, _ = self._encode_text([(text, False)], images, label)
        return ids, blocks
