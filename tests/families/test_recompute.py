"""`train.gradient_checkpointing: [llm]`: only the chosen components recompute their layers in the
backward pass (counted: the MLP of the LLM's first layer runs twice, the vision tower's once), with the same loss
and gradients as no checkpointing, for three families; bad lists are refused by name."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from families.test_train_families import inputs_for
from vlmtune.checkpoints.load import load_model
from vlmtune.config import ConfigError
from vlmtune.training.recompute import recompute

# the MLP inside each first layer: a recompute stops once it has what the backward needs, so hooks that
# run after a module returns may not fire again; a pre-hook on a module inside the layer does
LAYERS = {"llava": ("model.language_model.layers.0.mlp", "model.vision_tower.encoder.layers.0.mlp"),
          "qwen2_vl": ("model.language_model.layers.0.mlp", "model.visual.blocks.0.mlp"),
          "mgm": ("model.language_model.layers.0.mlp", "model.vision_tower.encoder.layers.0.mlp")}


def loss_and_grads(model, inputs):
    model.zero_grad()
    out = model(**inputs, labels=inputs["input_ids"])
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family_name", LAYERS)
def test_only_the_chosen_component_recomputes_with_equal_gradients(family_model, family_name):
    loaded = load_model(family_model(family_name, "bytelevel"))
    model = loaded.model.train()
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "blue"}]}]
    inputs = inputs_for(loaded.processor, loaded.family, chat, Image.new("RGB", (30, 20), (0, 0, 255)))
    torch.manual_seed(0)
    plain_loss, plain = loss_and_grads(model, inputs)

    assert recompute(model, loaded.family, ["llm"]) == {"llm": ["model.language_model"]}
    calls = {name: 0 for name in LAYERS[family_name]}
    for name in calls:
        model.get_submodule(name).register_forward_pre_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    torch.manual_seed(0)
    loss, grads = loss_and_grads(model, inputs)
    llm_layer, vision_layer = LAYERS[family_name]
    assert calls == {llm_layer: 2, vision_layer: 1}  # the LLM layer ran again in the backward pass
    assert torch.equal(loss, plain_loss) and grads.keys() == plain.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)

    with pytest.raises(ConfigError, match="`train.gradient_checkpointing`: lm is not a component of the"):
        recompute(model, loaded.family, ["lm"])
    with pytest.raises(ConfigError, match="the projector has no layers transformers can recompute"):
        recompute(model, loaded.family, ["projector"])


def test_a_run_with_llm_checkpointing_trains(tiny_vlm, tmp_path, capsys):
    from conftest import make_image, write_jsonl

    from vlmtune.config import load_config
    from vlmtune.training.run import train

    records = []
    for i, color in enumerate(["red", "blue", "green", "red"]):
        make_image(tmp_path / f"{i}.png", color)
        records.append({"id": str(i), "images": [f"{i}.png"], "messages": [
            {"role": "user", "content": "<image>What color?"}, {"role": "assistant", "content": color}]})
    cfg = load_config(tree={"model": {"path": str(tiny_vlm)}, "data": {"train": str(write_jsonl(tmp_path / "t.jsonl", records))},
                            "train": {"max_steps": 4, "batch_size": 4, "lr": 1e-2, "logging_steps": 1, "save_steps": 0,
                                      "warmup_ratio": 0.0, "gradient_checkpointing": ["llm"]},
                            "output": {"dir": str(tmp_path / "out")}})
    result = train(cfg)
    assert result.final_loss < result.first_loss
    assert "gradient checkpointing: llm (model.language_model)" in capsys.readouterr().out
