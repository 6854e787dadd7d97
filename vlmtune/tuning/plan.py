"""A `TuningPlan` says, for each component of the model's family (vision, projector, llm, or any
others the family names), whether it is frozen, fully trained or LoRA-trained, and at which learning
rate; it applies itself to a model and builds the optimizer's parameter groups.

LoRA components become one PEFT adapter; fully trained components of a LoRA run are PEFT
`modules_to_save`, so the run's output is a standard adapter folder that `peft` loads onto its base.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from peft import LoraConfig, get_peft_model
from torch import nn

from vlmtune.config.schema import TuneConfig
from vlmtune.models.family import PEFT_PREFIX, Family
from vlmtune.tuning.blocks import BlockError, block_paths


class PlanError(ValueError):
    """A `tune:` section that does not fit the model's family; lists every problem."""


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
    kept_frozen: list[str] = field(default_factory=list)  # parameters of full components an adapter cannot carry
    blocks: dict[str, list[str]] = field(default_factory=dict)  # component -> module paths `tune.blocks` selects

    def __post_init__(self) -> None:
        self.validate()

    @property
    def components(self) -> list[str]:
        return list(self.family.components)

    def validate(self) -> None:
        """Every `tune.*`, `tune.lr.*` and `tune.lora.targets.*` key names a component of the family."""
        problems = []
        explicit = set(self.tune.model_fields_set) | set(self.tune.model_extra or {})
        named = [f"tune.{c}" for c in self.tune.modes() if c in explicit]
        named += [f"tune.lr.{c}" for c, v in self.tune.lr.model_dump().items() if v is not None]
        named += [f"tune.lora.targets.{c}" for c in self.tune.lora.targets]
        named += [f"tune.blocks.{c}" for c in self.tune.blocks]
        problems += [f"`tune.blocks.{c}`: the {c} is frozen; blocks select what trains inside a full or LoRA component"
                     for c in self.tune.blocks if c in self.family.components and self.mode(c) == "frozen"]
        for key in named:
            section, component = key.rsplit(".", 1)
            if component not in self.family.components:
                close = self.family.closest_component(component)
                hint = f" (did you mean `{section}.{close}`?)" if close else ""
                problems.append(f"`{key}`: the {self.family.name} family has no component {component!r}{hint}; "
                                f"its components are {', '.join(self.family.components)}")
        if problems:
            raise PlanError("; ".join(problems))

    def mode(self, component: str) -> str:
        leader = dict(self.family.follows).get(component)
        if leader and component not in set(self.tune.model_fields_set) | set(self.tune.model_extra or {}):
            return "full" if self.mode(leader) == "full" else "frozen"
        return self.tune.mode(component)

    def lr(self, component: str) -> float:
        return getattr(self.tune.lr, component, None) or self.default_lr

    @property
    def uses_lora(self) -> bool:
        return any(self.mode(c) == "lora" for c in self.components)

    def component_of(self, name: str) -> str | None:
        return self.family.component_of(name)

    def apply(self, model: nn.Module) -> nn.Module:
        """Freeze, unfreeze and wrap `model` as planned; returns the model to train (maybe a PeftModel)."""
        self.family.check_components(model)
        try:
            self.blocks = {c: block_paths(model, self.family.components[c], specs, f"tune.blocks.{c}")
                           for c, specs in self.tune.blocks.items()}
        except BlockError as err:
            raise PlanError(str(err)) from None
        self.totals = {c: 0 for c in self.components}
        for name, param in model.named_parameters():
            component = self.component_of(name)
            self.totals[component] += param.numel()
            param.requires_grad = self.mode(component) == "full" and self.in_blocks(name, component)
        if not self.uses_lora:
            return model
        model = get_peft_model(model, self.lora_config(model))
        for name, param in model.named_parameters():
            if name.removeprefix(PEFT_PREFIX) in self.kept_frozen:
                param.requires_grad = False
        return model

    def in_blocks(self, name: str, component: str) -> bool:
        """Inside the blocks `tune.blocks` selects for the component (everything when it selects none)."""
        paths = self.blocks.get(component)
        return paths is None or any(name == p or name.startswith(p + ".") for p in paths)

    def lora_config(self, model: nn.Module) -> LoraConfig:
        settings = self.tune.lora
        alternatives = []
        for component in self.components:
            if self.mode(component) != "lora":
                continue
            names = settings.targets.get(component) or self._linear_names(model, component)
            if not names:
                raise PlanError(f"tune.{component}=lora, but the {component} has no linear layers to adapt")
            unmatched = [n for n in names if n not in self._linear_names(model, component, all_layers=True)]
            if unmatched:
                raise PlanError(f"`tune.lora.targets.{component}`: {', '.join(unmatched)} match(es) no layer of the "
                                f"{component}; its linear layers are named: {', '.join(self._linear_names(model, component))}")
            prefixes = "|".join(re.escape(p) for p in self.blocks.get(component, self.family.components[component]))
            inner = [p for c in self.components if c != component for p in self.family.components[c]
                     if any(p.startswith(q + ".") for q in self.family.components[component])]
            exclude = "".join(rf"(?!{re.escape(p)}\.)" for p in inner)  # a nested component is not this one
            alternatives.append(rf"{exclude}(?:{prefixes})\.(?:.*\.)?(?:{'|'.join(map(re.escape, names))})")
        full = [m for c in self.components if self.mode(c) == "full" for m in self._full_modules(model, c)]
        return LoraConfig(
            r=settings.r,
            lora_alpha=settings.alpha,
            lora_dropout=settings.dropout,
            target_modules="|".join(alternatives),
            modules_to_save=full or None,
        )

    def _full_modules(self, model: nn.Module, component: str) -> list[str]:
        """The modules PEFT saves whole (`modules_to_save`) for a fully trained component of a LoRA run.

        A component with another one nested inside it (Qwen's vision tower around its merger) is split
        into its children, so the nested component keeps its own mode; containers (ModuleList) are
        split into their items, which PEFT can wrap. A bare parameter (LLaVA-NeXT's `image_newline`)
        cannot be carried by an adapter: it stays frozen, and the plan says so."""
        modules = dict(model.named_modules())
        others = [p for c in self.components if c != component for p in self.family.components[c]]
        out = []

        def walk(path: str) -> None:
            module = modules.get(path)
            if module is None:
                self.kept_frozen.append(path)
                return
            nested = any(o.startswith(path + ".") for o in others)
            if not nested and not isinstance(module, (nn.ModuleList, nn.ModuleDict)):
                out.append(path)
                return
            self.kept_frozen += [f"{path}.{n}" for n, _ in module.named_parameters(recurse=False)]
            for child, _ in module.named_children():
                if f"{path}.{child}" not in others:
                    walk(f"{path}.{child}")

        for prefix in self.blocks.get(component, self.family.components[component]):
            walk(prefix)
        return out

    def _linear_names(self, model: nn.Module, component: str, all_layers: bool = False) -> list[str]:
        """Distinct names of the component's linear layers (a component that is itself one Linear, such
        as the output head, is not a default target)."""
        names = set()
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and self.component_of(name) == component:
                if not all_layers and name.removeprefix(PEFT_PREFIX) in self.family.components[component]:
                    continue
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
                raise PlanError(f"trainable parameter {name} belongs to no component of the {self.family.name} family")
            decay = param.ndim >= 2 and weight_decay > 0
            group = groups.setdefault(
                (component, decay),
                {"params": [], "lr": self.lr(component), "weight_decay": weight_decay if decay else 0.0, "name": component},
            )
            group["params"].append(param)
        return list(groups.values())

    def rows(self, model: nn.Module) -> list[ComponentRow]:
        trainable = {c: 0 for c in self.components}
        for name, param in model.named_parameters():
            component = self.component_of(name)
            if component and param.requires_grad:
                trainable[component] += param.numel()
        return [
            ComponentRow(c, self.mode(c), trainable[c], self.totals.get(c, 0), self.lr(c) if self.mode(c) != "frozen" else None)
            for c in self.components
        ]

    def describe(self) -> dict:
        """The plan as plain data, for the manifest."""
        return {
            c: {"mode": self.mode(c), "lr": self.lr(c) if self.mode(c) != "frozen" else None} for c in self.components
        } | {"lora": self.tune.lora.model_dump() if self.uses_lora else None,
             "kept_frozen": list(self.kept_frozen), "blocks": dict(self.blocks)}
