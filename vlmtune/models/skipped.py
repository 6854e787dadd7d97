"""Vision layers whose output never reaches the language model, run as identities while training.

LLaVA-style models give the LLM a hidden state from inside the vision tower (`vision_feature_layer`:
-2 in LLaVA-1.5, the second-to-last layer's output), yet transformers runs the whole tower: the layers
after the one selected cost forward time and activation memory, and no gradient ever reaches them.
Training runs them as identities instead (MiniCPM-V's authors drop the last SigLIP layer for the same
reason). Nothing else changes: the hidden states the model selects are the same tensors, those layers'
weights get no gradient either way (the optimizer leaves them as they were, and every saved folder
holds them unchanged), and the module tree and its keys stay as they are; the original forwards come
back when training ends (merge, verify and inference run the whole model)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from torch import nn

from vlmtune.models.family import base_model


def after_feature_layer(tower: str) -> Callable[[nn.Module], list[str]]:
    """For a family whose config selects `vision_feature_layer` (an index, or several) from the hidden
    states of the tower at module path `tower`: the names of the tower's layers after the last one
    selected. Hidden state 0 is the embeddings, hidden state i the output of layer i."""

    def unused(model: nn.Module) -> list[str]:
        base = base_model(model)
        config = base.config
        selected = getattr(config, "vision_feature_layer", None)
        count = getattr(getattr(config, "vision_config", None), "num_hidden_layers", None)
        if selected is None or not count:
            return []
        indices = [selected] if isinstance(selected, int) else list(selected)
        last = max(i if i >= 0 else i + count + 1 for i in indices)
        stacks = [(name, m) for name, m in base.named_modules()
                  if name.startswith(tower + ".") and name.endswith("encoder.layers")
                  and isinstance(m, nn.ModuleList) and len(m) == count]
        if len(stacks) != 1:  # a tower of another shape: run it whole rather than guess
            return []
        return [f"{stacks[0][0]}.{i}" for i in range(last, count)]

    return unused


def _passthrough(hidden_states, *args, **kwargs):
    return hidden_states  # transformers 5's encoder layers return their hidden states as one tensor


@contextlib.contextmanager
def forwards_replaced(modules: list[nn.Module], replace: Callable[[Callable], Callable]) -> Iterator[None]:
    """Within the block each module's forward is `replace(its forward)`; its own is back afterwards, also
    when the block raises — the class's, or one set on the module itself (accelerate's device hooks wrap
    a module's forward that way). The module tree, its keys and its hooks stay as they are."""
    before = [module.__dict__.get("forward") for module in modules]
    for module, forward in zip(modules, before):
        module.forward = replace(forward or type(module).forward.__get__(module))
    try:
        yield
    finally:
        for module, forward in zip(modules, before):
            if forward is None:
                del module.forward  # the instance attribute: the class's forward shows again
            else:
                module.forward = forward


@contextlib.contextmanager
def skipping(model: nn.Module, names: list[str]) -> Iterator[None]:
    """Within the block, the named modules of `model` (as `Family.layers_not_run` names them) return
    their input (`forwards_replaced`)."""
    base = base_model(model)
    with forwards_replaced([base.get_submodule(name) for name in names], lambda original: _passthrough):
        yield
