"""Gradient checkpointing for some components only (`train.gradient_checkpointing: [llm]`): the LLM's
activations are usually most of a VLM's, while a small vision tower's are cheap to keep, so
recomputing only the LLM saves most of the memory for part of the time. The Trainer's switch covers
the whole model; this turns it on for the transformers models inside the chosen components."""

from __future__ import annotations

from transformers import PreTrainedModel

from vlmtune.config import ConfigError
from vlmtune.models.family import Family, base_model


def recompute(model, family: Family, components: list[str]) -> dict[str, list[str]]:
    """Turn checkpointing on in each component's outermost transformers models; returns their paths."""
    base = base_model(model)
    unknown = [c for c in components if c not in family.components]
    if unknown:
        raise ConfigError(f"`train.gradient_checkpointing`: {', '.join(unknown)} is not a component of the "
                          f"{family.name} family ({', '.join(family.components)})")
    done: dict[str, list[str]] = {}
    for component in components:
        found = []
        for prefix in family.components[component]:
            try:
                module = base.get_submodule(prefix)
            except AttributeError:
                continue
            enabled: list[str] = []  # relative to the prefix; named_modules lists parents first
            for name, sub in module.named_modules():
                inside = any(not outer or name.startswith(outer + ".") for outer in enabled)
                if isinstance(sub, PreTrainedModel) and sub.supports_gradient_checkpointing and not inside:
                    sub.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                    enabled.append(name)
            found += [f"{prefix}.{name}" if name else prefix for name in enabled]
        if not found:
            raise ConfigError(f"`train.gradient_checkpointing`: the {component} has no layers transformers can "
                              f"recompute ({', '.join(family.components[component])}); leave it out of the list")
        done[component] = found
    return done
