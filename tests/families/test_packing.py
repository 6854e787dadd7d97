"""Packed rows give the loss and gradients of the same samples run one by one; logits only at
labelled positions give the loss of full logits; length grouping batches similar lengths."""

from __future__ import annotations

import json
from unittest.mock import patch

import pytest
import torch
from conftest import make_image, write_jsonl
from safetensors.torch import load_file

from vlmtune.checkpoints.load import load_model
from vlmtune.config import ConfigError, load_config
from vlmtune.data.check import check_data, encode_checked
from vlmtune.data.dataset import ConversationDataset, collator_for
from vlmtune.data.encode import SampleEncoder
from vlmtune.data.packing import PackedDataset, PackedRows, pack_groups
from vlmtune.models.positions import packed_inputs
from vlmtune.models import segments
from vlmtune.models.segments import IMPLEMENTATION, switch_to_segments, uses_segments
from vlmtune.training.run import train
from vlmtune.training.trainer import label_positions, supervised_loss


def mixed_data(folder, count=6):
    """Samples of different lengths: one or two images of different sizes, multi-turn, text only."""
    records = []
    for i in range(count):
        make_image(folder / f"{i}.png", ("red", "green", "blue")[i % 3], size=(16, 40, 24)[i % 3])
        turns = [{"role": "user", "content": "<image>What color?"}, {"role": "assistant", "content": "red " * (1 + i)}]
        if i % 2:
            turns += [{"role": "user", "content": "And again?"}, {"role": "assistant", "content": "It is blue."}]
        images = [f"{i}.png"]
        if i == 4:
            turns[0]["content"] = "<image><image>Both colors?"
            images.append("0.png")
        records.append({"id": f"s{i}", "messages": turns, "images": images})
    records.append({"id": "text", "messages": [{"role": "user", "content": "Hello there"},
                                               {"role": "assistant", "content": "yes, hello"}]})
    return write_jsonl(folder / "train.jsonl", records)


def encoded(loaded, data):
    report = encode_checked(check_data([str(data)], None), SampleEncoder(loaded.processor, loaded.family, 4096))
    assert not report.problems
    return ConversationDataset(report.encoded, loaded.processor, loaded.family)


def summed_loss_one_by_one(model, dataset, collator):
    """The model's own loss (its mean times its labelled count) per sample, added up."""
    total = 0
    for i in range(len(dataset)):
        batch = collator([dataset[i]])
        count = (batch["labels"][:, 1:] != -100).sum()
        total = total + model(**batch).loss * count
    return total


def packed_loss(model, family, batch):
    """As the trainer computes it (`packed_inputs`)."""
    batch = packed_inputs(model, family, batch)
    labels = batch.pop("labels")
    outputs = model(**batch, logits_to_keep=label_positions(labels))
    return supervised_loss(outputs, labels, num_items_in_batch=1)  # a sum


@pytest.mark.parametrize("family_name,kind", [
    ("llava", "sentencepiece"), ("llava", "bytelevel"), ("qwen2_vl", "sentencepiece"), ("qwen2_vl", "bytelevel"),
    ("llava_next", "bytelevel_bos"), ("qwen2_5_vl", "bytelevel"), ("qwen3_vl", "bytelevel"), ("idefics3", "bytelevel_bos"),
    ("smolvlm", "bytelevel"), ("minicpmv4_6", "bytelevel"), ("mgm", "bytelevel")])
def test_packed_rows_give_the_loss_and_gradients_of_single_samples(family_model, family_name, kind, tmp_path):
    """With the attention training switches to (per sample where the model runs SDPA)."""
    loaded = load_model(family_model(family_name, kind))
    model = loaded.model.eval()  # no dropout: the two computations must see the same function
    per_sample = switch_to_segments(model)
    ran = compare_packed_with_single_samples(loaded, model, tmp_path)
    # every transformers family attends per sample in its language model; MGM's own forward takes
    # no extra keywords, so it keeps the row mask (the same numbers)
    assert per_sample == (family_name != "mgm") and (ran > 0) == per_sample


@pytest.mark.parametrize("family_name", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("attention", ["sdpa", IMPLEMENTATION])
def test_packed_rows_agree_under_the_row_mask_and_per_sample_attention(family_model, family_name, attention, tmp_path):
    """transformers' block-diagonal mask over the whole row (SDPA) and attention per sample
    (`vlmtune.models.segments`) give the same loss and gradients as the samples one by one."""
    loaded = load_model(family_model(family_name, "sentencepiece"))
    model = loaded.model.eval()
    assert switch_to_segments(model) and uses_segments(model)  # every part of these runs SDPA
    model.set_attn_implementation(attention)
    compare_packed_with_single_samples(loaded, model, tmp_path)


def compare_packed_with_single_samples(loaded, model, tmp_path):
    dataset = encoded(loaded, mixed_data(tmp_path))
    collator = collator_for(loaded.family, loaded.processor.tokenizer.pad_token_id)
    packed = PackedDataset(dataset, max_length=max(len(item.input_ids) for item in dataset.items) * 3)
    assert len(packed) < len(dataset)  # several samples share rows
    batch = PackedRows(collator)([packed[i] for i in range(len(packed))])
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == len(packed)

    reference = summed_loss_one_by_one(model, dataset, collator)
    reference.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    calls = []
    grouped = segments._groups
    with patch.object(segments, "_groups", lambda cu: calls.append(cu) or grouped(cu)):
        loss = packed_loss(model, loaded.family, batch)
    loss.backward()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    assert expected
    for name, grad in expected.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-5, msg=name)
    return len(calls)  # language-model layers that attended per sample


def test_logits_only_at_labels_give_the_full_logits_loss(family_model, tmp_path):
    loaded = load_model(family_model("llava", "sentencepiece"))
    dataset = encoded(loaded, mixed_data(tmp_path))
    batch = collator_for(loaded.family, loaded.processor.tokenizer.pad_token_id)([dataset[i] for i in range(4)])
    labels = batch.pop("labels")
    with torch.no_grad():
        full = loaded.model(**batch, labels=labels)
        sliced = loaded.model(**batch, logits_to_keep=label_positions(labels))
    assert sliced.logits.shape == (int((labels[:, 1:] != -100).sum()), full.logits.shape[-1])
    assert supervised_loss(sliced, labels).item() == pytest.approx(full.loss.item(), rel=1e-6)
    assert supervised_loss(full, labels).item() == pytest.approx(full.loss.item(), rel=1e-6)


def test_pack_groups_places_every_sample_once_within_the_limit():
    lengths = [5, 9, 3, 7, 2, 10, 1]
    groups = pack_groups(lengths, 10)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in g) <= 10 for g in groups)
    assert sorted(map(sorted, groups)) == [[0, 4], [1, 6], [2, 3], [5]]  # first fit, longest first
    with pytest.raises(ValueError, match="sample 1 has 9 tokens, more than data.max_length=8"):
        pack_groups([3, 9], 8)


@pytest.mark.parametrize("family_name", ["llava", "qwen2_vl"])
def test_training_with_packing_and_length_groups_lowers_the_loss_and_reloads(family_model, family_name, tmp_path):
    model_dir = family_model(family_name, "bytelevel")
    out = tmp_path / "out"
    cfg = load_config(tree={"model": {"path": str(model_dir)},
                            "data": {"train": str(mixed_data(tmp_path / "data", count=9)), "max_length": 160,
                                     "packing": True, "group_by_length": True},
                            "tune": {"vision": "frozen", "projector": "full", "llm": "full"},
                            "train": {"max_steps": 8, "batch_size": 2, "lr": 1e-2, "logging_steps": 1, "save_steps": 0,
                                      "warmup_ratio": 0.0},
                            "output": {"dir": str(out)}})
    result = train(cfg)  # ends with `verify` on the saved folder
    assert result.final_loss < result.first_loss
    assert load_model(out).family.name == family_name


@pytest.mark.parametrize("key", ["packing", "padding_free"])
def test_packing_is_refused_for_a_family_it_is_not_tested_for(family_model, key, tmp_path):
    cfg = load_config(tree={"model": {"path": str(family_model("gemma3", "bytelevel"))},
                            "data": {"train": str(mixed_data(tmp_path / "data")), key: True},
                            "train": {"max_steps": 1}, "output": {"dir": str(tmp_path / "out")}})
    with pytest.raises(ConfigError, match=f"`data.{key}`: packed rows are not supported for the gemma3 family yet "
                                          f".*llava.*; set data.{key}=false"):
        train(cfg)


def test_length_groups_come_from_encoded_lengths_without_loading_a_sample(family_model, tmp_path):
    from transformers import TrainingArguments

    from vlmtune.training.trainer import VlmTrainer

    loaded = load_model(family_model("llava", "bytelevel"))
    dataset = encoded(loaded, mixed_data(tmp_path / "data", count=9))
    loads = []

    class Counted(type(dataset)):
        def __getitem__(self, index):
            loads.append(index)
            return super().__getitem__(index)

    dataset.__class__ = Counted
    lengths = [len(item.input_ids) for item in dataset.items]
    args = TrainingArguments(output_dir=str(tmp_path / "o"), per_device_train_batch_size=2, use_cpu=True,
                             report_to="none")
    trainer = VlmTrainer(model=loaded.model, args=args, train_dataset=dataset, family=loaded.family, lengths=lengths)
    order = list(trainer._get_train_sampler())
    assert sorted(order) == list(range(len(dataset))) and not loads
    assert lengths[order[0]] == max(lengths)  # the longest batch goes first (an early out-of-memory, not a late one)
    by_batch = [sorted(lengths[i] for i in order[k:k + 2]) for k in range(0, len(order), 2)]
    spread = sum(b[-1] - b[0] for b in by_batch)
    assert spread < sum(b[-1] - b[0] for b in (sorted(lengths[k:k + 2]) for k in range(0, len(lengths), 2)))


@pytest.mark.parametrize("family_name", ["llava", "qwen2_vl", "idefics3"])
def test_a_text_only_batch_still_gives_every_tower_parameter_a_gradient(family_model, family_name, tmp_path):
    """What several processes need (see keep_vision_busy): a batch without images reaches every tower
    parameter an image batch reaches, with zero gradients, and the loss and other gradients unchanged."""
    from vlmtune.training.trainer import blank_image_inputs, keep_vision_busy

    loaded = load_model(family_model(family_name, "bytelevel"))
    model = loaded.model.eval()
    dataset = encoded(loaded, mixed_data(tmp_path))
    collator = collator_for(loaded.family, loaded.processor.tokenizer.pad_token_id)
    tower = {n for n, _ in model.named_parameters() if loaded.family.component_of(n) == "vision"}

    def step(index):  # as VlmTrainer computes it: the loss from the returned logits
        batch = collator([dataset[index]])
        labels = batch.pop("labels")
        loss = supervised_loss(model(**batch), labels)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return loss.item(), grads

    _, with_image = step(next(i for i, item in enumerate(dataset.items) if item.images))
    used = tower & set(with_image)
    text_only = next(i for i, item in enumerate(dataset.items) if not item.images)
    plain_loss, plain = step(text_only)
    assert used and not used & set(plain)  # the situation several processes cannot sync
    handles = keep_vision_busy(model, blank_image_inputs(loaded.processor))
    busy_loss, busy = step(text_only)
    for handle in handles:
        handle.remove()
    assert busy_loss == plain_loss
    assert used <= set(busy) and not any(busy[n].any() for n in used)
    for name, grad in plain.items():
        torch.testing.assert_close(busy[name], grad)


def test_per_sample_attention_gives_the_row_masks_logits_and_gradients_for_long_uneven_samples():
    """Samples longer and shorter than a group (32 tokens), grouped-query heads, rows with a padding
    tail: the same logits and gradients as SDPA with transformers' block-diagonal mask."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=50, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).eval()
    rows = [[3, 70, 33, 1, 93], [200]]  # the second row: one sample, no room left
    lengths = torch.tensor([row + [0] * (5 - len(row)) for row in rows])
    ids = torch.randint(0, 50, (2, 200))
    positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in rows])

    def run(**extra):
        model.zero_grad()
        logits = model(input_ids=ids, position_ids=positions, use_cache=False, **extra).logits
        logits.square().mean().backward()
        return logits, {n: p.grad.clone() for n, p in model.named_parameters()}

    masked, masked_grads = run()
    assert switch_to_segments(model)
    per_sample, grads = run(**segments.segment_kwargs(lengths))
    torch.testing.assert_close(per_sample, masked, rtol=1e-5, atol=1e-5)
    for name, grad in masked_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    cu = segments.segment_kwargs(lengths)["cu_seq_lens_q"]
    assert cu.tolist() == [0, 3, 73, 106, 107, 200, 400]
    assert sorted(index.shape[1] for index, _ in segments._groups(cu)[0]) == [32, 64, 96, 224]


@pytest.mark.parametrize("family_name,kind", [("llava", "sentencepiece"), ("qwen2_vl", "bytelevel"),
                                              ("idefics3", "bytelevel_bos")])
def test_padding_free_batches_train_like_padded_ones(family_model, family_name, kind, tmp_path, capsys):
    """The same samples each step as unpacked training (the sampler is unchanged), joined in one row: the
    step losses and the saved weights of the padded run, without computing its padding."""
    model_dir = family_model(family_name, kind)
    data = mixed_data(tmp_path / "data", count=9)

    def run(name, **data_settings):
        out = tmp_path / name
        cfg = load_config(tree={"model": {"path": str(model_dir)},
                                "data": {"train": str(data), "max_length": 160, **data_settings},
                                "tune": {"vision": "full", "projector": "full", "llm": "full"},
                                "train": {"max_steps": 6, "batch_size": 3, "lr": 1e-2, "logging_steps": 1,
                                          "save_steps": 0, "warmup_ratio": 0.0, "seed": 5},
                                "output": {"dir": str(out)}})
        result = train(cfg)
        steps = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
        return result, [s["loss"] for s in steps if "loss" in s], load_file(out / "model.safetensors")

    padded, padded_losses, padded_weights = run("padded")
    assert "data.padding_free:" not in capsys.readouterr().out
    joined, joined_losses, joined_weights = run("joined", padding_free=True)
    assert "data.padding_free: each batch's 3 samples joined in one row" in capsys.readouterr().out
    assert len(joined_losses) == len(padded_losses) == 6
    assert joined_losses == pytest.approx(padded_losses, rel=1e-4)
    assert joined.final_loss < joined.first_loss
    assert joined_weights.keys() == padded_weights.keys()
    for key in padded_weights:
        torch.testing.assert_close(joined_weights[key], padded_weights[key], rtol=1e-3, atol=1e-4, msg=key)


def test_one_padding_free_row_holds_the_batch_and_its_images(family_model, tmp_path):
    loaded = load_model(family_model("llava", "bytelevel"))
    dataset = encoded(loaded, mixed_data(tmp_path / "data"))
    rows = PackedDataset(dataset, None)
    assert len(rows) == len(dataset)  # one sample a row: the sampler draws samples, as unpacked
    batch = PackedRows(collator_for(loaded.family, loaded.processor.tokenizer.pad_token_id), one_row=True)(
        [rows[i] for i in (4, 0, 6)])
    sizes = [len(dataset[i]["input_ids"]) for i in (4, 0, 6)]
    assert batch["input_ids"].shape == (1, sum(sizes))
    assert batch["pack_lengths"].tolist() == [sizes + [0]]
    assert batch["pack_images"].tolist() == [[2, 1, 0, 0]]  # sample 4 has two images, the text sample none
    assert batch["pixel_values"].shape[0] == 3


def test_packing_and_padding_free_are_refused_together(tmp_path):
    with pytest.raises(ConfigError, match="`data.packing` and `data.padding_free` both join samples into rows: choose one"):
        load_config(tree={"model": {"path": "m"}, "data": {"train": "t.jsonl", "packing": True, "padding_free": True},
                          "output": {"dir": str(tmp_path)}})
