"""One LLaMA-Factory training run for peers.py, run by LLaMA-Factory's own python (its environment has
its own transformers, and no vlmtune): `python llamafactory_run.py ARGS.json`. It calls LLaMA-Factory's
`run_exp` with those arguments, as `llamafactory-cli train` would, and wraps its SFT trainer to count
what the training batches hold (the same count as vlmtune's and TRL's runs) and to time `train()`
alone, the same span the other tools time. Prints the one RESULT line harness.alternate reads."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

STARTED = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import instrument, report_peer  # noqa: E402  (harness needs only the standard library here)


def main() -> None:
    from llamafactory.train.sft import workflow
    from llamafactory.train.sft.trainer import CustomSeq2SeqTrainer
    from llamafactory.train.tuner import run_exp

    seen, timing, first_step = instrument(CustomSeq2SeqTrainer, lambda trainer: trainer.processing_class.pad_token_id,
                                          STARTED)
    # after training it writes a model card, which under transformers 5.6 fails for a plain (not PEFT)
    # model (`create_or_update_model_card` is PEFT's); the card is not part of what is measured
    workflow.create_modelcard_and_push = lambda *args, **kwargs: None
    run_exp(json.loads(Path(sys.argv[1]).read_text()), callbacks=[first_step])
    report_peer(seen, timing)


if __name__ == "__main__":
    main()
