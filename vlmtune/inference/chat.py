"""`vlmtune chat`: an interactive conversation that streams tokens as they are generated."""

from __future__ import annotations

import sys
from pathlib import Path
from threading import Thread
from typing import TextIO

import torch
from transformers import TextIteratorStreamer

from vlmtune.models.loaded import LoadedModel
from vlmtune.checkpoints.load import load_model
from vlmtune.config import ConfigError
from vlmtune.data.images import image_problem, load_image
from vlmtune.data.encode import SampleEncoder
from vlmtune.models import images as mm
from vlmtune.models.device import inference_device, model_device, place

HELP = "commands: /image PATH (attach an image to your next message), /reset (start over), /help, /quit"


def chat(model: str | Path | LoadedModel, image: str | None = None, max_new_tokens: int = 256,
         stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout, device: str = "auto") -> list[dict]:
    """Read user lines from `stdin`, stream answers to `stdout`; returns the conversation.

    A bad `--image` is refused before the model loads; a bad `/image` is refused when given, and the
    conversation goes on."""
    if image and (problem := image_problem(Path(image))):
        raise ConfigError(f"--image: {problem}")
    inference_device(device)  # a bad --device is refused before the model loads
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    processor, family, net = loaded.processor, loaded.family, place(loaded.model, device)
    messages: list[dict] = []
    images: list = []
    pending = image
    print(HELP, file=stdout)
    while True:
        print("you> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line or line.strip() == "/quit":
            return messages
        line = line.strip()
        if not line:
            continue
        if line == "/help":
            print(HELP, file=stdout)
            continue
        if line == "/reset":
            messages, images, pending = [], [], None
            print("conversation cleared", file=stdout)
            continue
        if line.startswith("/image"):
            candidate = line.removeprefix("/image").strip()
            problem = image_problem(Path(candidate)) if candidate else "give an image path: /image PATH"
            if problem:
                print(f"not attached: {problem}", file=stdout)
            else:
                pending = candidate
                print(f"attached {candidate} to your next message", file=stdout)
            continue
        if line.startswith("/"):
            print(f"unknown command {line.split()[0]}; {HELP}", file=stdout)
            continue
        parts = []
        if pending:
            images.append(load_image(Path(pending), "chat"))
            parts.append({"type": "image"})
            pending = None
        parts.append({"type": "text", "text": line})
        messages.append({"role": "user", "content": parts})
        answer = _reply(net, processor, family, messages, images, max_new_tokens, stdout)
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})


def _reply(net, processor, family, messages, images, max_new_tokens, stdout) -> str:
    encoder = SampleEncoder(processor, family, max_length=sys.maxsize)
    ids, blocks = encoder.generation_ids(messages, images)
    inputs = {"input_ids": torch.tensor([ids])}
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    inputs.update({key: torch.tensor([values]) for key, values in encoder.extra_inputs(ids).items()})
    if images:
        inputs.update(mm.image_inputs(processor, images, blocks, "chat"))
    device = model_device(net)
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs = {k: v.to(device) for k, v in inputs.items()} | {
        "max_new_tokens": max_new_tokens, "do_sample": False, "streamer": streamer,
        "suppress_tokens": mm.placeholder_ids(processor),
        "pad_token_id": processor.tokenizer.pad_token_id}
    worker = Thread(target=lambda: net.generate(**kwargs))
    worker.start()
    print("model> ", end="", file=stdout, flush=True)
    pieces = []
    for piece in streamer:
        pieces.append(piece)
        print(piece, end="", file=stdout, flush=True)
    worker.join()
    print(file=stdout)
    return "".join(pieces).strip()
