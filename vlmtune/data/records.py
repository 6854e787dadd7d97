"""Read data files in every supported format into one canonical `Sample`.

Formats (see docs/data.md): LLaVA `conversations` with `from/value`, MiniCPM-V `conversations` with
`role/content`, ShareGPT `messages` + `images`, and chat messages with content parts.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
IMAGE_TAG = "<image>"
_NUMBERED_TAG = re.compile(r"<image_\d+>")


@dataclass
class Message:
    role: str  # system | user | assistant
    parts: list[dict]  # {"type": "text", "text": ...} | {"type": "image"}
    train: bool = True  # False: an assistant turn excluded from the loss (ms-swift `"loss": false`)

    def chat_dict(self) -> dict:
        """The message as chat templates expect it (content parts)."""
        return {"role": self.role, "content": [dict(p) for p in self.parts]}

    @property
    def text(self) -> str:
        return "".join(p["text"] for p in self.parts if p["type"] == "text")


@dataclass
class Sample:
    id: str
    where: str  # "train.jsonl line 12": how a person finds it
    messages: list[Message]
    images: list[Path] = field(default_factory=list)  # in order of appearance

    def label(self) -> str:
        return f"{self.where} (id {self.id})"


@dataclass
class Problem:
    where: str
    sample_id: str | None
    message: str

    def __str__(self) -> str:
        sid = f" (id {self.sample_id})" if self.sample_id is not None else ""
        return f"{self.where}{sid}: {self.message}"


class DataError(ValueError):
    """Data that cannot be used; the message lists each problem with its file and line."""

    def __init__(self, problems: list[Problem], summary: str = ""):
        self.problems = problems
        shown = "\n".join(f"  - {p}" for p in problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        super().__init__(f"{summary or f'{len(problems)} problem(s) in the data'}:\n{shown}{more}")


def iter_records(path: Path) -> Iterator[tuple[str, dict | None, Problem | None]]:
    """Yield (where, record, problem) for each record of a JSON array or JSON Lines file.

    Bytes are decoded per line (JSON Lines) or per record (JSON array), so invalid UTF-8 anywhere is a
    problem of the line or record that holds it, never of the whole file."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()
    except OSError as err:
        yield path.name, None, Problem(str(path), None, f"cannot read the file: {err}")
        return
    if head.startswith(b"["):
        yield from _json_array(path)
    else:
        yield from _json_lines(path)


def _bad_utf8(value) -> bool:
    """Whether a value decoded with `surrogateescape` holds bytes that were not valid UTF-8."""
    if isinstance(value, str):
        return any("\udc80" <= ch <= "\udcff" for ch in value)
    if isinstance(value, dict):
        return any(_bad_utf8(k) or _bad_utf8(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_bad_utf8(v) for v in value)
    return False


UTF8_HINT = "not valid UTF-8; re-save the file as UTF-8"


def _json_array(path: Path):
    text = path.read_bytes().removeprefix(b"\xef\xbb\xbf").decode("utf-8", errors="surrogateescape")
    try:
        records = json.loads(text)
    except json.JSONDecodeError as err:
        yield path.name, None, Problem(f"{path.name} line {err.lineno}", None, f"broken JSON: {err.msg} (column {err.colno})")
        return
    for i, record in enumerate(records):
        where = f"{path.name} record {i}"
        if not isinstance(record, dict):
            yield where, None, Problem(where, None, f"a record must be a JSON object, got {type(record).__name__}")
        elif _bad_utf8(record):
            yield where, None, Problem(where, None, UTF8_HINT)
        else:
            yield where, record, None


def _json_lines(path: Path):
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            where = f"{path.name} line {lineno}"
            try:
                line = raw.removeprefix(b"\xef\xbb\xbf").decode("utf-8") if lineno == 1 else raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield where, None, Problem(where, None, f"byte {raw[err.start]:#04x} at column {err.start + 1} is {UTF8_HINT}")
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                yield where, None, Problem(where, None, f"broken JSON: {err.msg} (column {err.colno})")
                continue
            if isinstance(record, dict):
                yield where, record, None
            else:
                yield where, None, Problem(where, None, f"a record must be a JSON object, got {type(record).__name__}")


def parse_record(record: dict, where: str, image_dir: Path) -> tuple[Sample | None, list[Problem]]:
    """Turn one record of any supported format into a `Sample`, or say everything wrong with it."""
    sample_id = str(record["id"]) if record.get("id") is not None else where.split(" ", 1)[-1]
    problems: list[str] = []
    if isinstance(record.get("conversations"), list):
        turns = record["conversations"]
        minicpm = bool(turns) and isinstance(turns[0], dict) and "role" in turns[0]
        messages, images = _parse_tagged_turns(turns, record.get("image"), problems, minicpm=minicpm)
    elif isinstance(record.get("messages"), list):
        turns = record["messages"]
        if any(isinstance(t, dict) and isinstance(t.get("content"), list) for t in turns):
            messages, images = _parse_content_parts(turns, problems)
        else:
            messages, images = _parse_tagged_turns(turns, record.get("images"), problems, minicpm=False)
    else:
        problems.append("no `conversations` or `messages` list: not a known format (see docs/data.md)")
        messages, images = [], []

    if not problems:
        if not messages:
            problems.append("empty conversation")
        elif not any(m.role == "assistant" for m in messages):
            problems.append("no assistant turn: nothing to learn from")
        elif any(m.role == "assistant" and not m.text.strip() for m in messages):
            problems.append("an assistant turn is empty")
    resolved = []
    for image in images:
        if not isinstance(image, str) or not image:
            problems.append(f"image entry {image!r} is not a path")
        elif image.startswith(("http://", "https://", "data:")):
            problems.append(f"image {image[:60]!r} is a URL or inline data; download it and give a file path")
        else:
            resolved.append(Path(image) if Path(image).is_absolute() else image_dir / image)
    if problems:
        return None, [Problem(where, sample_id, p) for p in problems]
    return Sample(sample_id, where, messages, resolved), []


def _role(turn: dict, index: int, key: str, problems: list[str]) -> str | None:
    raw = turn.get(key)
    role = ROLE_NAMES.get(str(raw).lower()) if raw is not None else None
    if role is None:
        problems.append(f"turn {index} has unknown role {raw!r} (expected human/gpt/system or user/assistant/system)")
    return role


def _parse_tagged_turns(turns: list, image_field, problems: list[str], minicpm: bool):
    """Turns whose text carries `<image>` tags (LLaVA, ShareGPT) or `<image_NN>` tags (MiniCPM-V)."""
    first = turns[0] if turns and isinstance(turns[0], dict) else {}
    role_key, text_key = ("role", "content") if (minicpm or "role" in first) else ("from", "value")
    numbered: dict[str, str] = {}
    if isinstance(image_field, dict):  # MiniCPM-V multi-image: {"<image_00>": path, ...}
        numbered, paths = image_field, []
    elif isinstance(image_field, str):
        paths = [image_field]
    elif isinstance(image_field, list):
        paths = list(image_field)
    elif image_field is None:
        paths = []
    else:
        problems.append(f"`image(s)` must be a path, a list of paths or a tag map, got {type(image_field).__name__}")
        return [], []

    messages: list[Message] = []
    images: list[str] = []
    tag_count = 0
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict):
            problems.append(f"turn {index} is not an object (got {json.dumps(turn)[:40]})")
            continue
        role = _role(turn, index, role_key, problems)
        text = turn.get(text_key)
        if not isinstance(text, str):
            problems.append(f"turn {index} has no text `{text_key}`")
            continue
        parts = []
        pattern = _NUMBERED_TAG if numbered else re.compile(re.escape(IMAGE_TAG))
        pos = 0
        for match in pattern.finditer(text):
            if match.start() > pos:
                parts.append({"type": "text", "text": text[pos:match.start()]})
            parts.append({"type": "image"})
            tag_count += 1
            if numbered:
                if match.group() not in numbered:
                    problems.append(f"turn {index} uses tag {match.group()} that `image` does not map")
                else:
                    images.append(numbered[match.group()])
            pos = match.end()
        if pos < len(text):
            parts.append({"type": "text", "text": text[pos:]})
        if role:
            messages.append(Message(role, parts, train=turn.get("loss", True) is not False))

    if not numbered:
        if minicpm and len(paths) == 1 and tag_count == 0:  # MiniCPM-V: an untagged image opens the first user turn
            first_user = next((m for m in messages if m.role == "user"), None)
            if first_user is not None:
                first_user.parts.insert(0, {"type": "image"})
                tag_count = 1
        if tag_count != len(paths):
            problems.append(f"{tag_count} image tag(s) in the text but {len(paths)} image(s) given")
        images = paths
    elif len(set(images)) != len(numbered) and not problems:
        unused = sorted(set(numbered) - {t for m in turns if isinstance(m, dict) for t in _NUMBERED_TAG.findall(str(m.get(text_key, "")))})
        problems.append(f"image tag(s) {', '.join(unused)} are mapped but never used in the text")
    return messages, images


def _parse_content_parts(turns: list, problems: list[str]):
    """Chat messages whose content is a list of `{"type": "text"|"image", ...}` parts."""
    messages, images = [], []
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict):
            problems.append(f"message {index} is not an object (got {json.dumps(turn)[:40]})")
            continue
        role = _role(turn, index, "role", problems)
        content = turn.get("content")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        parts = []
        for part in content if isinstance(content, list) else []:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image":
                source = part.get("image") or part.get("path") or part.get("url")
                if source is None:
                    problems.append(f"message {index} has an image part without `image`/`path`")
                images.append(source)
                parts.append({"type": "image"})
            else:
                problems.append(f"message {index} has a content part of unknown type {kind!r} (expected text or image)")
        if role:
            messages.append(Message(role, parts, train=turn.get("loss", True) is not False))
    return messages, images


def iter_samples(path: str | Path, images_root: str | Path | None = None) -> Iterator[tuple[Sample | None, list[Problem]]]:
    """(sample or None, its problems) for each record in file order; image paths resolve against
    `images_root` or the file's folder."""
    path = Path(path)
    if not path.is_file():
        yield None, [Problem(str(path), None, "data file does not exist")]
        return
    image_dir = Path(images_root) if images_root else path.parent
    for where, record, problem in iter_records(path):
        yield (None, [problem]) if problem else parse_record(record, where, image_dir)


def read_samples(path: str | Path, images_root: str | Path | None = None) -> tuple[list[Sample], list[Problem]]:
    samples, problems = [], []
    for sample, found in iter_samples(path, images_root):
        if sample:
            samples.append(sample)
        problems += found
    return samples, problems
