"""Turn a `Sample` into token ids and labels through the model's own chat template.

The conversation is rendered turn by turn: the text an assistant turn adds to the rendered prefix is
what gets trained, so masking works with any prefix-stable chat template. Each image tag is then
expanded to exactly the number of placeholder tokens the model's family says it takes; truncation
never cuts through an image's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vlmtune.data.records import Sample
from vlmtune.models.registry import Family

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


class SampleEncoder:
    def __init__(self, processor, family: Family, max_length: int, loss_on: str = "assistant"):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.family = family
        self.max_length = max_length
        self.loss_on = loss_on
        self.image_token_id = processor.image_token_id

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

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
                    "located for loss masking; use a prefix-stable template or `data.loss_on=all`"
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

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []

    def _expand_images(self, ids: list[int], labels: list[int], images: list[Path]):
        """Replace each image tag token by its block of placeholder tokens; returns the block spans."""
        found = sum(1 for t in ids if t == self.image_token_id)
        if found != len(images):
            raise SampleDropped(f"{found} image token(s) after applying the chat template, but {len(images)} image(s)")
        counts = self.family.image_token_counts(self.processor, images)
        out_ids, out_labels, spans = [], [], []
        image_index = 0
        for token, label in zip(ids, labels):
            if token == self.image_token_id:
                start = len(out_ids)
                out_ids += [token] * counts[image_index]
                out_labels += [IGNORE] * counts[image_index]
                spans.append((start, len(out_ids)))
                image_index += 1
            else:
                out_ids.append(token)
                out_labels.append(label)
        return out_ids, out_labels, spans

    def encode(self, sample: Sample) -> EncodedSample:
        """Ids and labels for training; raises `SampleDropped` when nothing trainable fits."""
        segments = self._segments(sample)
        ids, labels = [], []
        for (_, trained), piece in zip(segments, self._tokenize([text for text, _ in segments])):
            ids += piece
            labels += piece if trained else [IGNORE] * len(piece)
        ids, labels, spans = self._expand_images(ids, labels, sample.images)
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
            ids, labels, images = ids[:cut], labels[:cut], images[: len(kept)]
        return EncodedSample(sample, ids, labels, images, full_length)

    def prompt(self, sample: Sample) -> Prompt:
        """The conversation up to its last assistant turn, ready for generation."""
        last = max(i for i, m in enumerate(sample.messages) if m.role == "assistant")
        head = sample.messages[:last]
        images = list(sample.images[: sum(1 for m in head for p in m.parts if p["type"] == "image")])
        ids = self.generation_ids([m.chat_dict() for m in head], images)
        if len(ids) > self.max_length:
            raise SampleDropped(f"the prompt alone has {len(ids)} tokens, more than max_length={self.max_length}")
        return Prompt(sample, ids, images, sample.messages[last].text)

    def generation_ids(self, chat: list[dict], images: list) -> list[int]:
        """Token ids of `chat` followed by the assistant prompt, image tags expanded."""
        ids = self._tokenize([self.render(chat, add_generation_prompt=True)])[0]
        return self._expand_images(ids, [IGNORE] * len(ids), images)[0]
