"""Loss masking, image-token expansion and truncation that never cuts an image."""

import pytest
from conftest import make_image
from transformers import AutoProcessor

from vlmtune.data.encode import IGNORE, SampleDropped, SampleEncoder
from vlmtune.data.records import Message, Sample
from vlmtune.models.llava import LLAVA

IMAGE_TOKENS = 4  # 16px images, 8px patches, CLS dropped


@pytest.fixture(scope="module")
def processor(tiny_vlm):
    return AutoProcessor.from_pretrained(tiny_vlm)


def text(t):
    return [{"type": "text", "text": t}]


def conversation(tmp_path, n_images=1, train_first=True):
    images = [make_image(tmp_path / f"{i}.png") for i in range(n_images)]
    return Sample("x", "t.jsonl line 1", [
        Message("system", text("Be brief.")),
        Message("user", [{"type": "image"}] * n_images + text("What color?")),
        Message("assistant", text("red"), train=train_first),
        Message("user", text("Sure?")),
        Message("assistant", text("yes")),
    ], images)


def trained_text(processor, encoded):
    return processor.tokenizer.decode([t for t, label in zip(encoded.input_ids, encoded.labels) if label != IGNORE])


def test_assistant_turns_are_trained_and_images_expanded(processor, tmp_path):
    encoder = SampleEncoder(processor, LLAVA, max_length=512, loss_on="assistant")
    encoded = encoder.encode(conversation(tmp_path, n_images=2))
    image_positions = [i for i, t in enumerate(encoded.input_ids) if t == processor.image_token_id]
    assert len(image_positions) == 2 * IMAGE_TOKENS
    assert all(encoded.labels[i] == IGNORE for i in image_positions)
    # exactly the two answers and their end-of-turn tokens are trained
    assert trained_text(processor, encoded) == "red</s> yes</s>"
    rendered = processor.tokenizer.decode(encoded.input_ids)
    assert rendered.startswith("<s><|system|> Be brief.</s><|user|><image>")


def test_last_turn_all_and_loss_false(processor, tmp_path):
    sample = conversation(tmp_path)
    last = SampleEncoder(processor, LLAVA, 512, "last_turn").encode(sample)
    assert trained_text(processor, last) == "yes</s>"
    everything = SampleEncoder(processor, LLAVA, 512, "all").encode(sample)
    untrained = [t for t, label in zip(everything.input_ids, everything.labels) if label == IGNORE]
    assert untrained == [processor.image_token_id] * IMAGE_TOKENS  # all text is trained, images never
    skipped = SampleEncoder(processor, LLAVA, 512, "assistant").encode(conversation(tmp_path, train_first=False))
    assert trained_text(processor, skipped) == "yes</s>"


def test_truncation_keeps_whole_images(processor, tmp_path):
    sample = conversation(tmp_path, n_images=3)
    full = SampleEncoder(processor, LLAVA, 512).encode(sample)
    first_image = full.input_ids.index(processor.image_token_id)
    # a budget that would end inside the second image block: the cut moves before it, dropping images 2 and 3
    budget = first_image + IMAGE_TOKENS + 2
    with pytest.raises(SampleDropped, match="no trained token fits"):
        SampleEncoder(processor, LLAVA, budget).encode(sample)
    # answers are after the images, so a text-only tail can be cut while keeping all images whole
    cut = SampleEncoder(processor, LLAVA, full.full_length - 2).encode(sample)
    assert cut.truncated and len(cut.input_ids) == full.full_length - 2
    assert cut.input_ids.count(processor.image_token_id) == 3 * IMAGE_TOKENS and len(cut.images) == 3


def test_truncation_drops_images_it_cannot_keep_whole(processor, tmp_path):
    images = [make_image(tmp_path / f"{i}.png") for i in range(2)]
    sample = Sample("y", "t.jsonl line 2", [
        Message("user", [{"type": "image"}] + text("Describe.")),
        Message("assistant", text("red")),
        Message("user", [{"type": "image"}] + text("And this?")),
        Message("assistant", text("blue")),
    ], images)
    full = SampleEncoder(processor, LLAVA, 512).encode(sample)
    second_image = len(full.input_ids) - full.input_ids[::-1].index(processor.image_token_id) - IMAGE_TOKENS
    cut = SampleEncoder(processor, LLAVA, second_image + 1).encode(sample)
    assert cut.images == images[:1]  # the second image would be cut: it goes, whole
    assert len(cut.input_ids) <= second_image
    assert cut.input_ids.count(processor.image_token_id) == IMAGE_TOKENS
    assert trained_text(processor, cut) == "red</s>"


def test_prompt_for_generation(processor, tmp_path):
    prompt = SampleEncoder(processor, LLAVA, 512).prompt(conversation(tmp_path))
    assert prompt.target == "yes"
    assert processor.tokenizer.decode(prompt.input_ids).endswith("Sure?</s><|assistant|>")
