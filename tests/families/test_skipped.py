"""Vision layers after `vision_feature_layer` run as identities in training: the same loss and
gradients, their weights saved unchanged, their forward back afterwards."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from families.test_packing import encoded, mixed_data
from vlmtune.checkpoints.load import load_model
from vlmtune.config import load_config
from vlmtune.data.dataset import collator_for
from vlmtune.models.skipped import skipping
from vlmtune.training.run import train

TOWER = "model.vision_tower.encoder.layers"  # the tiny models' CLIP tower (2 layers) inside LLaVA


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family_name,kind", [("llava", "sentencepiece"), ("llava_next", "bytelevel_bos")])
def test_skipped_layers_change_no_loss_and_no_gradient(family_model, family_name, kind, tmp_path):
    loaded = load_model(family_model(family_name, kind))
    model = loaded.model.eval()  # no dropout: both passes must compute the same function
    unused = loaded.family.unused_layers(model)
    assert unused == [f"{TOWER}.1"]  # 2 layers, hidden state -2 = the first layer's output
    dataset = encoded(loaded, mixed_data(tmp_path))
    batch = collator_for(loaded.family, loaded.processor.tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])
    assert batch["pixel_values"].shape[0] > 0
    whole_loss, whole = loss_and_grads(model, batch)
    calls = []
    hook = model.get_submodule(unused[0]).register_forward_hook(lambda *a: calls.append(1))
    with skipping(model, unused):
        skipped_loss, skipped = loss_and_grads(model, batch)
    hook.remove()
    assert calls  # the layer is still called (its hooks run), only its own computation is not
    torch.testing.assert_close(skipped_loss, whole_loss, rtol=0, atol=1e-6)
    assert skipped.keys() == whole.keys() and not any(n.startswith(unused[0]) for n in whole)
    for name in whole:
        torch.testing.assert_close(skipped[name], whole[name], rtol=1e-5, atol=1e-7)
    # the class's forward is back: the layer computes again
    layer = model.get_submodule(unused[0])
    x = torch.randn(1, 3, layer.layer_norm1.normalized_shape[0])
    assert not torch.equal(layer(x, None), x)


def test_the_forward_comes_back_when_training_raises(family_model):
    model = load_model(family_model("llava", "bytelevel")).model
    layer = model.get_submodule(f"{TOWER}.1")
    with pytest.raises(RuntimeError, match="stop"), skipping(model, [f"{TOWER}.1"]):
        assert layer.forward("h") == "h"
        raise RuntimeError("stop")
    assert "forward" not in vars(layer)
    # a forward set on the module itself (as accelerate's device hooks do) comes back as it was
    hooked = layer.forward = lambda *args, **kwargs: "hooked"
    with skipping(model, [f"{TOWER}.1"]):
        assert layer("h") == "h"
    assert layer.forward is hooked and layer("h") == "hooked"


@pytest.mark.parametrize("selected,expected", [(-1, []), (2, []), (1, ["1"]), (0, ["0", "1"]), ([-3, -2], ["1"]), ([0, 2], [])])
def test_which_layers_are_unused(family_model, selected, expected):
    loaded = load_model(family_model("llava", "bytelevel"))
    loaded.model.config.vision_feature_layer = selected
    assert loaded.family.unused_layers(loaded.model) == [f"{TOWER}.{i}" for i in expected]


def test_a_training_run_saves_the_skipped_layer_unchanged(family_model, tmp_path, capsys):
    source = family_model("llava", "sentencepiece")
    data = mixed_data(tmp_path / "data")
    out = tmp_path / "out"
    cfg = load_config(tree={"model": {"path": str(source)}, "data": {"train": str(data), "max_length": 512},
                            "tune": {"vision": "full", "projector": "full", "llm": "full"},
                            "train": {"max_steps": 4, "batch_size": 4, "lr": 1e-2, "save_steps": 0,
                                      "logging_steps": 1},
                            "output": {"dir": str(out)}})
    result = train(cfg)  # verified: the folder loads and runs the whole tower
    assert result.final_loss < result.first_loss
    assert f"not run in training (their output never reaches the LLM; saved unchanged): {TOWER}.1" in capsys.readouterr().out
    before, after = load_file(source / "model.safetensors"), load_file(out / "model.safetensors")
    # as saved: transformers 5 writes LLaVA's keys in the older naming (no `model.` level)
    skipped = [k for k in before if k.startswith(f"{TOWER.removeprefix('model.')}.1.")]
    trained = [k for k in before if k.startswith(f"{TOWER.removeprefix('model.')}.0.")]
    assert skipped and all(torch.equal(before[k], after[k]) for k in skipped)
    assert any(not torch.equal(before[k], after[k]) for k in trained)  # the tower itself did train
    assert json.loads((out / "vlmtune.json").read_text())["components"]["vision"]["mode"] == "full"
