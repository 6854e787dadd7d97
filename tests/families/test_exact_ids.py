"""What vlmtune trains on is what the model's own processor produces: same ids (BOS included), same
per-token inputs, for every family and three kinds of tokenizer; only the answers carry loss."""

import pytest
import torch
from conftest import make_image
from PIL import Image
from transformers import AutoConfig, AutoProcessor

from families.conftest import FAMILIES
from families.tiny import TOKENIZER_KINDS
from vlmtune.data.encode import IGNORE, SampleEncoder
from vlmtune.data.records import Message, Sample
from vlmtune.models.registry import family_for


def text(t):
    return [{"type": "text", "text": t}]


def two_image_sample(tmp_path):
    images = [make_image(tmp_path / "a.png", "red", size=16), make_image(tmp_path / "b.png", "blue", size=40)]
    return Sample("x", "t.jsonl line 1", [
        Message("system", text("Be brief.")),
        Message("user", [{"type": "image"}] + text("What color?")),
        Message("assistant", text("red")),
        Message("user", [{"type": "image"}] + text("And this one?")),
        Message("assistant", text("blue")),
    ], images)


@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
@pytest.mark.parametrize("family_name", FAMILIES)
def test_ids_equal_the_processor_and_only_answers_are_trained(family_model, family_name, kind, tmp_path):
    folder = family_model(family_name, kind)
    processor = AutoProcessor.from_pretrained(folder)
    family = family_for(AutoConfig.from_pretrained(folder))
    assert family.name == family_name
    sample = two_image_sample(tmp_path)
    encoded = SampleEncoder(processor, family, max_length=4096).encode(sample)

    chat = [m.chat_dict() for m in sample.messages]
    images = [Image.open(p).convert("RGB") for p in sample.images]
    expected = processor.apply_chat_template(chat, tokenize=True, return_dict=True, images=images, return_tensors="pt")
    assert encoded.input_ids == expected["input_ids"][0].tolist()
    for key in family.token_type_keys:
        assert encoded.extra[key] == expected[key][0].tolist()

    trained = [t for t, label in zip(encoded.input_ids, encoded.labels) if label != IGNORE]
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    pieces = processor.tokenizer.decode(trained, skip_special_tokens=False)
    assert pieces.replace("\n", "") == "red<|im_end|>blue<|im_end|>"
    assert trained.count(eos) == 2
    # the answer ids are the ids the whole conversation has there: no stray "▁" from separate tokenization
    whole = processor.tokenizer(processor.apply_chat_template(chat, tokenize=False), add_special_tokens=False)["input_ids"]
    assert all(t in whole for t in trained)
    assert len(encoded.block_spans) == 2
    for first, last in encoded.block_spans:
        assert all(label == IGNORE for label in encoded.labels[first:last])


@pytest.mark.parametrize("family_name", ["llava", "qwen2_vl", "idefics3"])
def test_truncation_never_cuts_an_image_block(family_model, family_name, tmp_path):
    folder = family_model(family_name)
    processor = AutoProcessor.from_pretrained(folder)
    family = family_for(AutoConfig.from_pretrained(folder))
    sample = two_image_sample(tmp_path)
    full = SampleEncoder(processor, family, max_length=4096).encode(sample)
    second_start, second_end = full.block_spans[1]
    cut = SampleEncoder(processor, family, max_length=second_start + 2).encode(sample)
    assert len(cut.images) == 1 and len(cut.block_spans) == 1
    assert len(cut.input_ids) <= second_start and cut.input_ids == full.input_ids[:len(cut.input_ids)]
    assert torch.tensor(cut.labels).ne(IGNORE).any()
