"""Batched generation over a data file, and exact-match evaluation against the last assistant turn."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from vlmtune.models.loaded import LoadedModel
from vlmtune.checkpoints.load import load_model
from vlmtune.console import console
from vlmtune.data.check import check_data
from vlmtune.data.dataset import ConversationDataset, collator_for
from vlmtune.models import images as mm
from vlmtune.models.device import inference_device, model_device, place
from vlmtune.models.family import LoadOptions
from vlmtune.data.encode import SampleDropped, SampleEncoder
from vlmtune.data.records import DataError, Problem


@dataclass
class Prediction:
    id: str
    where: str
    prediction: str
    target: str

    @property
    def correct(self) -> bool:
        return normalize(self.prediction) == normalize(self.target)


def normalize(text: str) -> str:
    """Case, surrounding space and trailing punctuation do not count against an exact match."""
    return re.sub(r"\s+", " ", text.strip().lower()).rstrip(".!?")


def generate_predictions(
    model: str | Path | LoadedModel,
    data: str | Path,
    images_root: str | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    max_length: int = 4096,
    options: LoadOptions | None = None,
    show_progress: bool = True,
    device: str = "auto",
) -> tuple[list[Prediction], list[Problem]]:
    """Greedy answers for every sample of `data` (prompt = everything before the last assistant turn),
    batched with the KV cache, on the GPU when there is one (`device`)."""
    inference_device(device)  # a bad --device is refused before the model loads
    loaded = model if isinstance(model, LoadedModel) else load_model(model, options=options)
    report = check_data([str(data)], images_root)
    encoder = SampleEncoder(loaded.processor, loaded.family, max_length)
    prompts, problems = [], list(report.problems)
    for sample in report.samples:
        try:
            prompts.append(encoder.prompt(sample))
        except SampleDropped as err:
            problems.append(Problem(sample.where, sample.id, str(err)))
    if not prompts:
        raise DataError(problems, f"{data}: no sample can be used for generation")

    tokenizer = loaded.processor.tokenizer
    net = place(loaded.model, device)
    device = model_device(net)
    loader = DataLoader(
        ConversationDataset(prompts, loaded.processor, loaded.family),
        batch_size=batch_size,
        collate_fn=collator_for(loaded.family, tokenizer.pad_token_id, padding_side="left"),
    )
    predictions, start = [], 0
    progress = tqdm(total=len(prompts), desc="generating", unit="sample", disable=not show_progress)
    with torch.inference_mode(), progress:
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            output = net.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                  suppress_tokens=mm.placeholder_ids(loaded.processor),
                                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            texts = tokenizer.batch_decode(output[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
            for prompt, text in zip(prompts[start:start + len(texts)], texts):
                predictions.append(Prediction(prompt.sample.id, prompt.sample.where, text.strip(), prompt.target))
            start += len(texts)
            progress.update(len(texts))
    return predictions, problems


def write_predictions(predictions: list[Prediction], out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as fh:
        for p in predictions:
            fh.write(json.dumps({"id": p.id, "where": p.where, "prediction": p.prediction, "target": p.target,
                                 "correct": p.correct}) + "\n")
    return out


def evaluate(model, data, out: str | Path | None = None, **kwargs) -> dict:
    """Exact-match accuracy of generated answers; per-sample results go to `out` (JSON Lines)."""
    predictions, problems = generate_predictions(model, data, **kwargs)
    correct = sum(p.correct for p in predictions)
    result = {"accuracy": correct / len(predictions), "correct": correct, "evaluated": len(predictions),
              "skipped": len(problems)}
    if out:
        write_predictions(predictions, out)
        result["results"] = str(out)
    for problem in problems[:10]:
        console.print(f"[yellow]skipped[/] {problem}")
    return result
