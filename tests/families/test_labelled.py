"""The LLM's last MLP run only at the positions whose logits are kept: the same loss and gradients as
the whole layer, in padded and packed batches, for every family it applies to; its forward back after."""

from __future__ import annotations

import pytest
import torch

from families.test_packing import encoded, mixed_data
from vlmtune.checkpoints.load import load_model
from vlmtune.config import load_config
from vlmtune.data.dataset import collator_for
from vlmtune.data.packing import PackedDataset, PackedRows
from vlmtune.models.labelled import kept_positions_only, last_mlp
from vlmtune.models.positions import packed_inputs
from vlmtune.models.segments import switch_to_segments
from vlmtune.training.run import train
from vlmtune.training.trainer import label_positions, supervised_loss

FAMILIES = [("llava", "sentencepiece"), ("llava_next", "bytelevel_bos"), ("qwen2_vl", "bytelevel"),
            ("qwen3_vl", "bytelevel"), ("idefics3", "bytelevel_bos"), ("smolvlm", "bytelevel"),
            ("minicpmv4_6", "bytelevel"), ("mgm", "sentencepiece")]


def loss_and_grads(model, family, batch, kept=None, packed=False):
    model.zero_grad(set_to_none=True)
    batch = packed_inputs(model, family, dict(batch)) if packed else dict(batch)
    labels = batch.pop("labels")
    keep = label_positions(labels)
    if kept is not None:
        kept.mask = keep
    loss = supervised_loss(model(**batch, logits_to_keep=keep), labels, num_items_in_batch=1)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, keep


def rows_seen(model, name):
    """The number of positions each call of the MLP's first linear layer gets."""
    seen = []
    first = next(m for m in model.get_submodule(name).modules() if isinstance(m, torch.nn.Linear))
    return seen, first.register_forward_pre_hook(lambda m, args: seen.append(args[0].reshape(-1, args[0].shape[-1]).shape[0]))


@pytest.mark.parametrize("family_name,kind", FAMILIES)
@pytest.mark.parametrize("packed", [False, True])
def test_the_last_mlp_on_kept_positions_changes_no_loss_and_no_gradient(family_model, family_name, kind, packed,
                                                                         tmp_path):
    loaded = load_model(family_model(family_name, kind))
    model = loaded.model.eval()  # no dropout: both passes must compute the same function
    name = last_mlp(model)
    count = model.config.get_text_config().num_hidden_layers
    assert name is not None and name.endswith(f"layers.{count - 1}.mlp"), name
    dataset = encoded(loaded, mixed_data(tmp_path))
    collator = collator_for(loaded.family, loaded.processor.tokenizer.pad_token_id)
    if packed:
        switch_to_segments(model)
        rows = PackedDataset(dataset, max(len(item.input_ids) for item in dataset.items) * 3)
        batch = PackedRows(collator)([rows[i] for i in range(len(rows))])
    else:
        batch = collator([dataset[i] for i in range(len(dataset))])
    whole_loss, whole, keep = loss_and_grads(model, loaded.family, batch, packed=packed)
    seen, hook = rows_seen(model, name)
    with kept_positions_only(model, name) as kept:
        kept_loss, kept_grads, _ = loss_and_grads(model, loaded.family, batch, kept, packed)
    hook.remove()
    assert seen == [int(keep.sum())] and 0 < seen[0] < keep.numel()  # only the kept positions ran
    torch.testing.assert_close(kept_loss, whole_loss, rtol=1e-6, atol=1e-6)
    assert kept_grads.keys() == whole.keys()
    for param in whole:
        torch.testing.assert_close(kept_grads[param], whole[param], rtol=1e-5, atol=1e-6, msg=param)
    # the forward is back: every position runs again
    seen, hook = rows_seen(model, name)
    loss_and_grads(model, loaded.family, batch, packed=packed)
    hook.remove()
    assert seen == [keep.numel()]


def test_the_mlp_runs_whole_without_a_mask_or_on_another_shape(family_model):
    loaded = load_model(family_model("llava", "bytelevel"))
    model = loaded.model.eval()
    name = last_mlp(model)
    mlp = model.get_submodule(name)
    x = torch.randn(2, 5, model.config.text_config.hidden_size)
    with torch.no_grad(), kept_positions_only(model, name) as kept:
        assert torch.equal(mlp(x), type(mlp).forward(mlp, x))  # no mask set (generation, inference)
        kept.mask = torch.zeros(2, 4, dtype=torch.bool)
        assert torch.equal(mlp(x), type(mlp).forward(mlp, x))  # another length: not this call's positions
        kept.mask = torch.tensor([[True, False, False, True, False]] * 2)
        out = mlp(x)
        torch.testing.assert_close(out[kept.mask], type(mlp).forward(mlp, x)[kept.mask])
        assert torch.equal(out[~kept.mask], torch.zeros(6, x.shape[-1]))
    assert "forward" not in vars(mlp)
    with kept_positions_only(model, None) as kept:
        assert kept is None  # no position-wise last MLP found: nothing changes


def test_a_training_run_with_checkpointing_and_lora_gives_the_weights_of_the_whole_layer(tiny_vlm, color_data, tmp_path,
                                                                                         capsys, monkeypatch):
    """Checkpointing recomputes the layer in backward (with the same step's mask); LoRA adapts the MLP."""
    def run(out):
        cfg = load_config(tree={"model": {"path": str(tiny_vlm)}, "data": {"train": str(color_data), "max_length": 64},
                                "tune": {"vision": "full", "projector": "full", "llm": "lora", "lora": {"dropout": 0.0}},
                                "train": {"max_steps": 6, "batch_size": 4, "lr": 1e-2, "save_steps": 0,
                                          "gradient_checkpointing": True, "logging_steps": 2},
                                "output": {"dir": str(out)}})
        return train(cfg)

    with_kept = run(tmp_path / "kept")
    printed = capsys.readouterr().out
    assert "model.language_model.layers.1.mlp runs only at the positions with a label" in printed
    import vlmtune.training.housekeeping as housekeeping

    monkeypatch.setattr(housekeeping, "last_mlp", lambda model: None)
    whole = run(tmp_path / "whole")
    assert "runs only at the positions with a label" not in capsys.readouterr().out
    assert with_kept.final_loss < with_kept.first_loss
    assert with_kept.final_loss == pytest.approx(whole.final_loss, rel=1e-4)
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "kept" / "adapter_model.safetensors"), load_file(tmp_path / "whole" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-5, msg=key)
