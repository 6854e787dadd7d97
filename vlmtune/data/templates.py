"""Chat templates: the model's own, or one the user names (`data.chat_template`), rendered the way the
template expects its content.

Most instruct LLMs' templates (ChatML / Qwen2-Instruct style) take each message's content as a
string and fail on content parts; VLM templates take parts. The renderer tries parts first and falls
back to strings (image placeholders inline), once, and a template that fails both ways is reported
by name before any training.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from vlmtune.models import images as mm

BUILTIN = ("default", "vicuna_v1", "chatml", "llama_2", "mistral_instruct")
_PROBE = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "VLMTUNE-Q"}]},
          {"role": "assistant", "content": [{"type": "text", "text": "VLMTUNE-A"}]}]


class TemplateError(ValueError):
    """A chat template that cannot render a conversation; the message names it and what to do."""


def builtin_template(name: str) -> str:
    return resources.files("vlmtune").joinpath("templates", f"{name}.jinja").read_text().removesuffix("\n")


def resolve_template(spec: str | None) -> str | None:
    """`data.chat_template`: a built-in name, a `.jinja` file, or None (the model's own)."""
    if spec is None:
        return None
    if spec in BUILTIN:
        return builtin_template(spec)
    path = Path(spec)
    if path.suffix == ".jinja":
        if not path.is_file():
            raise TemplateError(f"`data.chat_template`: {path} does not exist")
        return path.read_text().removesuffix("\n")
    raise TemplateError(f"`data.chat_template`: {spec!r} is neither a built-in template ({', '.join(BUILTIN)}) "
                        "nor a .jinja file")


def as_strings(messages: list[dict], image_token: str) -> list[dict]:
    """Content parts joined into one string per message, each image as its placeholder on its own line."""
    out = []
    for message in messages:
        content = message["content"]
        if not isinstance(content, str):
            content = "".join(f"{image_token}\n" if p["type"] == "image" else p.get("text", "") for p in content)
        out.append({**message, "content": content})
    return out


class TemplateRenderer:
    def __init__(self, processor, chat_template: str | None = None, name: str | None = None):
        self.processor = processor
        self.template = resolve_template(chat_template)
        self.name = chat_template or name or "the model's chat template"
        self.image_token = mm.image_token(processor)
        if self.template is None and not getattr(processor, "chat_template", None):
            raise TemplateError(f"{self.name}: the model folder has no chat template; set `data.chat_template` to one "
                                f"of {', '.join(BUILTIN)} or a .jinja file")
        self.string_content = self._probe()

    def _render(self, messages, add_generation_prompt: bool, strings: bool) -> str:
        if strings:
            messages = as_strings(messages, self.image_token)
        extra = {"image_token": self.image_token} if self.template else {}  # our templates write the processor's token
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                  chat_template=self.template, **extra)

    def _probe(self) -> bool:
        """False when the template renders content parts, True when it needs strings; else an error."""
        errors = []
        for strings in (False, True):
            try:
                text = self._render(_PROBE, False, strings)
            except Exception as err:  # a template's own failure is the verdict, named below
                errors.append(f"{type(err).__name__}: {err}")
                continue
            if all(s in text for s in ("VLMTUNE-Q", "VLMTUNE-A", self.image_token)):
                return strings
            errors.append("the rendered text lost the message content or the image placeholder")
        raise TemplateError(f"{self.name} cannot render a conversation with an image ({'; '.join(errors)}); "
                            f"choose one with `data.chat_template` ({', '.join(BUILTIN)} or a .jinja file)")

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self._render(messages, add_generation_prompt, self.string_content)
