"""A `TuningPlan` says, for each component (vision, projector, llm), whether it is frozen, fully
trained or LoRA-trained, and at which learning rate; it applies itself to a model and builds the
optimizer's parameter groups.

LoRA components become one PEFT adapter; fully trained components of a LoRA run are PEFT
`modules_to_save`, so the run's output is a standard adapter folder that `peft` loads onto its base.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from peft import LoraConfig, get_peft_model
from torch import nn

from vlmtune.config.load import ConfigError
from vlmtune.config.schema import COMPONENTS, TuneConfig
from vlmtune.models.registry import Family

PEFT_PREFIX = "base_model.model."


@dataclass
class ComponentRow:
    name: str
    mode: str
    trainable: int
    total: int
    lr: float | None


@dataclass
class TuningPlan:
    tune: TuneConfig
    family: Family
    default_lr: float
    totals: dict[str, int] = field(default_factory=dict)

    def mode(self, component: str) -> str:
        return self.tune.mode(component)

    def lr(self, component: str) -> float:
        return getattr(self.tune.lr, component) or self.default_lr

    @property
    def uses_lora(self) -> bool:
        return any(self.mode(c) == "lora" for c in COMPONENTS)

    def component_of(self, name: str) -> str | None:
        return self.family.component_of(name)

    def apply(self, model: nn.Module) -> nn.Module:
        """Freeze, unfreeze and wrap `model` as planned; returns the model to train (maybe a PeftModel)."""
        self.totals = {c: 0 for c in COMPONENTS}
        for name, param in model.named_parameters():
            component = self.component_of(name)
            if component:
                self.totals[component] += param.numel()
            param.requires_grad = component is not None and self.mode(component) == "full"
        if not self.uses_lora:
            return model
        model = get_peft_model(model, self.lora_config(model))
        return model

    def lora_config(self, model: nn.Module) -> LoraConfig:
        settings = self.tune.lora
        alternatives = []
        for component in COMPONENTS:
            if self.mode(component) != "lora":
                continue
            names = settings.targets.get(component) or self._linear_names(model, component)
            if not names:
                raise ValueError(f"tune.{component}=lora, but the {component} has no linear layers to adapt")
            prefixes = "|".join(re.escape(p) for p in self.family.components[component])
            self._check_targets(model, component, prefixes, settings.targets.get(component, []))
            alternatives.append(rf"(?:{prefixes})\.(?:.*\.)?(?:{'|'.join(map(re.escape, names))})")
        full = [p for c in COMPONENTS if self.mode(c) == "full" for p in self.family.components[c]]
        return LoraConfig(
            r=settings.r,
            lora_alpha=settings.alpha,
            lora_dropout=settings.dropout,
            target_modules="|".join(alternatives),
            modules_to_save=full or None,
        )

    def _check_targets(self, model: nn.Module, component: str, prefixes: str, names: list[str]) -> None:
        """Each named target must match a layer: PEFT says nothing about a typo next to a valid name."""
        modules = [name for name, _ in model.named_modules()]
        unknown = [n for n in names if not any(re.fullmatch(rf"(?:{prefixes})\.(?:.*\.)?{re.escape(n)}", m) for m in modules)]
        if unknown:
            raise ConfigError(f"`tune.lora.targets.{component}`: {', '.join(unknown)} match(es) no layer of the {component}; "
                              f"its linear layers are named: {', '.join(self._linear_names(model, component))}")

    def _linear_names(self, model: nn.Module, component: str) -> list[str]:
        """Distinct names of the component's linear layers (the output head excluded)."""
        names = set()
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and self.component_of(name) == component:
                if name.removeprefix(PEFT_PREFIX) in self.family.components[component]:
                    continue  # a component that is itself one Linear (e.g. lm_head) is not a LoRA target
                names.add(name.rsplit(".", 1)[-1])
        return sorted(names)

    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict]:
        """One group per (component, decay) with the component's learning rate; no decay on biases and norms."""
        groups: dict[tuple[str, bool], dict] = {}
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            component = self.component_of(name)
            if component is None:
                raise ValueError(f"trainable parameter {name} belongs to no component of the {self.family.name} family")
            decay = param.ndim >= 2 and weight_decay > 0
            group = groups.setdefault(
                (component, decay),
                {"params": [], "lr": self.lr(component), "weight_decay": weight_decay if decay else 0.0, "name": component},
            )
            group["params"].append(param)
        return list(groups.values())

    def rows(self, model: nn.Module) -> list[ComponentRow]:
        trainable = {c: 0 for c in COMPONENTS}
        for name, param in model.named_parameters():
            component = self.component_of(name)
            if component and param.requires_grad:
                trainable[component] += param.numel()
        return [
            ComponentRow(c, self.mode(c), trainable[c], self.totals.get(c, 0), self.lr(c) if self.mode(c) != "frozen" else None)
            for c in COMPONENTS
        ]

    def describe(self) -> dict:
        """The plan as plain data, for the manifest."""
        return {
            c: {"mode": self.mode(c), "lr": self.lr(c) if self.mode(c) != "frozen" else None} for c in COMPONENTS
        } | {"lora": self.tune.lora.model_dump() if self.uses_lora else None}
