"""`vlmtune data show`: what a sample becomes — its tokens, each image's placeholder block, and which
tokens carry loss — the way users of other toolkits debug their chat templates."""

from __future__ import annotations

from rich.text import Text

from vlmtune.data.encode import IGNORE, EncodedSample


def as_json(encoded: EncodedSample) -> dict:
    return {"id": encoded.sample.id, "where": encoded.sample.where, "input_ids": encoded.input_ids,
            "labels": encoded.labels, "images": [str(p) for p in encoded.images],
            "image_blocks": [list(span) for span in encoded.block_spans], "truncated": encoded.truncated,
            **({"extra": encoded.extra} if encoded.extra else {})}


def as_text(encoded: EncodedSample, tokenizer) -> Text:
    """Trained tokens in green on a dark background, prompt tokens plain, each image block as one box."""
    out = Text()
    out.append(f"{encoded.sample.label()}: {len(encoded.input_ids)} tokens, "
               f"{sum(1 for label in encoded.labels if label != IGNORE)} trained\n", style="bold")
    blocks = {first: (index, last) for index, (first, last) in enumerate(encoded.block_spans)}
    position = 0
    while position < len(encoded.input_ids):
        if position in blocks:
            index, last = blocks[position]
            out.append(f"[image {index}: {last - position} tokens]", style="bold magenta")
            position = last
            continue
        piece = tokenizer.convert_ids_to_tokens(encoded.input_ids[position])
        trained = encoded.labels[position] != IGNORE
        out.append(piece.replace("\n", "\\n\n"), style="bold green on grey15" if trained else None)
        out.append("·", style="dim")  # token boundary
        position += 1
    return out
