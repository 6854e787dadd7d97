"""A synthetic image-QA data set: one coloured shape per image, rendered with Pillow.

Each image varies in shape, colour, size and quadrant; captions describe all four, questions ask
about one. Answers are single phrases, so exact-match accuracy is a fair measure.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (40, 60, 220), "yellow": (230, 200, 20)}
IMAGE_SIZE = 32
SIZES = {"small": 4, "large": 7}  # half-width in pixels
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
QUESTIONS = {
    "shape": "What shape is in the image?",
    "color": "What color is the shape?",
    "size": "Is the shape small or large?",
    "position": "Where is the shape?",
}
CAPTION_PROMPT = "Describe the image."


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    size: str
    position: str

    def caption(self) -> str:
        return f"a {self.size} {self.color} {self.shape} at the {self.position}."

    def answer(self, attribute: str) -> str:
        return getattr(self, attribute)


def random_scene(rng: random.Random) -> Scene:
    return Scene(rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(list(SIZES)), rng.choice(POSITIONS))


def render(scene: Scene, rng: random.Random, size: int = IMAGE_SIZE) -> Image.Image:
    """The shape somewhere inside its quadrant, on a lightly noisy background."""
    shade = rng.randint(225, 255)
    image = Image.new("RGB", (size, size), (shade, shade, shade))
    draw = ImageDraw.Draw(image)
    half = SIZES[scene.size]
    quarter = size // 4
    cx = quarter + (2 * quarter if "right" in scene.position else 0) + rng.randint(-2, 2)
    cy = quarter + (2 * quarter if "bottom" in scene.position else 0) + rng.randint(-2, 2)
    color = tuple(min(255, max(0, c + rng.randint(-20, 20))) for c in COLORS[scene.color])
    box = (cx - half, cy - half, cx + half, cy + half)
    if scene.shape == "circle":
        draw.ellipse(box, fill=color)
    elif scene.shape == "square":
        draw.rectangle(box, fill=color)
    else:
        draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=color)
    return image


def corpus() -> list[str]:
    """Every word the demo's conversations use, for training its tokenizer."""
    words = [*SHAPES, *COLORS, *SIZES, *POSITIONS, *QUESTIONS.values(), CAPTION_PROMPT]
    return [" ".join(words), *(Scene(s, c, z, p).caption() for s in SHAPES for c in COLORS for z in SIZES for p in POSITIONS)]


def write_images(folder: Path, count: int, rng: random.Random, prefix: str) -> list[tuple[str, Scene]]:
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(count):
        scene = random_scene(rng)
        name = f"{prefix}_{i:05d}.png"
        render(scene, rng).save(folder / name)
        items.append((f"images/{name}", scene))
    return items


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def make_dataset(out: Path, train_images: int = 2000, eval_images: int = 200, seed: int = 0,
                 questions_per_image: int = 4) -> dict[str, Path]:
    """Write images and three files: stage-1 captions (LLaVA format), stage-2 multi-turn questions
    (ShareGPT format), and held-out single questions for evaluation (LLaVA format)."""
    rng = random.Random(seed)
    train = write_images(out / "images", train_images, rng, "train")
    held_out = write_images(out / "images", eval_images, rng, "eval")
    captions = [
        {"id": f"cap{i}", "image": path,
         "conversations": [{"from": "human", "value": f"<image>\n{CAPTION_PROMPT}"}, {"from": "gpt", "value": scene.caption()}]}
        for i, (path, scene) in enumerate(train)
    ]
    questions = []
    for i, (path, scene) in enumerate(train):
        asked = rng.sample(list(QUESTIONS), questions_per_image)
        messages = []
        for turn, attribute in enumerate(asked):
            messages.append({"role": "user", "content": ("<image>" if turn == 0 else "") + QUESTIONS[attribute]})
            messages.append({"role": "assistant", "content": scene.answer(attribute)})
        questions.append({"id": f"qa{i}", "images": [path], "messages": messages})
    evaluation = []
    for i, (path, scene) in enumerate(held_out):
        attribute = list(QUESTIONS)[i % len(QUESTIONS)]
        evaluation.append({"id": f"eval{i}", "image": path, "conversations": [
            {"from": "human", "value": f"<image>\n{QUESTIONS[attribute]}"}, {"from": "gpt", "value": scene.answer(attribute)}]})
    return {
        "captions": write_jsonl(out / "captions.jsonl", captions),
        "questions": write_jsonl(out / "questions.jsonl", questions),
        "eval": write_jsonl(out / "eval.jsonl", evaluation),
    }
