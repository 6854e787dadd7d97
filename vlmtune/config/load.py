"""Read a run config from YAML plus `key=value` overrides, and report every problem at once."""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from vlmtune.config.schema import RunConfig


class ConfigError(ValueError):
    """A config that cannot be used; the message lists every problem, one per line."""


# names other tools (transformers TrainingArguments, LLaVA, LLaMA-Factory, PEFT) use for our keys: a user
# who types them is told our name, not the nearest spelling (`learning_rate` is closer to `logging_steps`)
ALIASES = {
    "learning_rate": "lr", "lr_scheduler_type": "lr_scheduler", "num_train_epochs": "epochs", "num_epochs": "epochs",
    "per_device_train_batch_size": "batch_size", "train_batch_size": "batch_size", "micro_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum", "warmup": "warmup_ratio", "output_dir": "dir",
    "model_name_or_path": "path", "vision_tower": "vision", "mm_projector_type": "projector",
    "pretrain_mm_mlp_adapter": "projector_weights", "data_path": "train", "train_files": "train",
    "image_folder": "images_root", "model_max_length": "max_length", "max_seq_length": "max_length",
    "cutoff_len": "max_length", "lora_r": "r", "rank": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
    "target_modules": "targets", "lora_target": "targets", "resume_from_checkpoint": "resume",
    "dataloader_num_workers": "num_workers",
}


def valid_keys(schema: type[BaseModel] = RunConfig, prefix: str = "") -> list[str]:
    """Every dotted key the schema accepts, e.g. `tune.lr.vision`."""
    keys = []
    for name, field in schema.model_fields.items():
        key = f"{prefix}{name}"
        sub = _section_type(field.annotation)
        keys.extend(valid_keys(sub, key + ".") if sub else [key])
    return keys


def _section_type(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def describe_keys() -> list[tuple[str, str, str]]:
    """(key, default, description) for every key, for `--help` and the docs."""
    rows = []

    def walk(schema: type[BaseModel], prefix: str) -> None:
        for name, field in schema.model_fields.items():
            sub = _section_type(field.annotation)
            if sub:
                walk(sub, f"{prefix}{name}.")
                continue
            default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
            rows.append((f"{prefix}{name}", default, field.description or ""))

    walk(RunConfig, "")
    return rows


def parse_override(text: str) -> tuple[list[str], Any]:
    """`tune.llm=lora` -> (["tune", "llm"], "lora"); values are read as YAML scalars or lists."""
    if "=" not in text:
        raise ConfigError(f"override `{text}` is not of the form key=value (e.g. `train.lr=2e-5`)")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    if not key:
        raise ConfigError(f"override `{text}` has no key before `=`")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        problem = str(err).splitlines()[0]
        raise ConfigError(f"override `{text}`: the value is not valid YAML ({problem}); quote it, "
                          "e.g. `tune.lora.targets={llm: [q_proj, v_proj]}`") from None
    return key.split("."), value


def apply_override(tree: dict, path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[path[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), tree: dict | None = None) -> RunConfig:
    """Build a validated `RunConfig` from a YAML file (or a dict) and overrides."""
    data: dict = copy.deepcopy(tree or {})  # overrides must not change the caller's dict
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (model, data, tune, train, output)")
        data = loaded
    for text in overrides:
        apply_override(data, *parse_override(text))
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_errors(err, source=str(path) if path else "config")) from None


def format_errors(err: ValidationError, source: str) -> str:
    keys = valid_keys()
    lines = [f"{source}: {err.error_count()} problem(s):"]
    for problem in err.errors():
        key = ".".join(str(p) for p in problem["loc"])
        if problem["type"] == "extra_forbidden":
            parent = key.rsplit(".", 1)[0] + "." if "." in key else ""
            siblings = [k for k in keys if k.startswith(parent)]
            alias = parent + ALIASES.get(key.rsplit(".", 1)[-1], "")
            guess = [alias] if alias in keys else difflib.get_close_matches(key, siblings, n=1, cutoff=0.6)
            hint = f"; did you mean `{guess[0]}`?" if guess else f"; valid keys here: {', '.join(sorted({_child(k, parent) for k in siblings}))}"
            lines.append(f"  - unknown key `{key}`{hint}")
        elif problem["type"] == "missing":
            lines.append(f"  - missing required key `{key}`")
        else:
            message = problem["msg"].removeprefix("Value error, ")
            got = problem.get("input")
            shown = "" if isinstance(got, dict) or got is None else f" (got {got!r})"
            lines.append(f"  - `{key}`: {message}{shown}" if key else f"  - {message}")
    return "\n".join(lines)


def _child(key: str, parent: str) -> str:
    return parent + key[len(parent):].split(".")[0]
