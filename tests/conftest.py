"""Shared fixtures: tiny random models built from configs, images and data files made on the fly."""

from __future__ import annotations

import json
import os
import random
import struct
import warnings
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", category=FutureWarning)
torch.set_num_threads(1)

from transformers.utils import logging as hf_logging  # noqa: E402

from vlmtune.checkpoints.save import save_model_folder  # noqa: E402
from vlmtune.models import llava, tiny  # noqa: E402

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()

COLORS = {"red": (255, 0, 0), "green": (0, 200, 0), "blue": (0, 0, 255)}
CORPUS = [
    "What color is the image? red green blue. Describe the picture. It is a plain square. Hello there, how are you?",
    "The system says: be brief. Yes no maybe. one two three four five six seven eight nine ten",
]


@pytest.fixture(scope="session")
def parts(tmp_path_factory) -> dict[str, Path]:
    """A tiny vision encoder folder and a tiny LLM folder (16px images, 8px patches: 4 image tokens)."""
    root = tmp_path_factory.mktemp("parts")
    tokenizer = tiny.build_tokenizer(CORPUS, vocab_size=200)
    vision = tiny.save_vision_encoder(root / "vision", image_size=16, patch_size=8, hidden=32, layers=2, heads=2)
    llm = tiny.save_language_model(root / "llm", tokenizer, hidden=32, layers=2, heads=2)
    return {"vision": vision, "llm": llm}


@pytest.fixture(scope="session")
def tiny_vlm(parts, tmp_path_factory) -> Path:
    """A complete tiny LLaVA model folder."""
    torch.manual_seed(0)
    model, processor = llava.build(str(parts["vision"]), str(parts["llm"]))
    return save_model_folder(model, processor, tmp_path_factory.mktemp("vlm") / "model", {"role": "test model"})


def make_image(path: Path, color: str = "red", size: int = 16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), COLORS[color]).save(path)
    return path


def png_header(path, width, height):
    """A PNG that claims `width` x `height` without holding its pixels: Pillow reads the size from the header."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))
    return path


def truncated_jpeg(path):
    rng = random.Random(0)
    image = Image.frombytes("RGB", (64, 64), bytes(rng.randrange(256) for _ in range(64 * 64 * 3)))
    image.save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[:data.index(b"\xff\xda") + 40])  # the header survives, most scan data does not
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def color_records(folder: Path, n: int = 24) -> list[dict]:
    """LLaVA-format samples: a plain-coloured image and its colour."""
    names = list(COLORS)
    records = []
    for i in range(n):
        color = names[i % len(names)]
        make_image(folder / "images" / f"{i}.png", color)
        records.append({"id": f"s{i}", "image": f"images/{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat color is the image?"}, {"from": "gpt", "value": color}]})
    return records


@pytest.fixture
def color_data(tmp_path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", color_records(tmp_path))
