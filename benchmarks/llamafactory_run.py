"""One LLaMA-Factory training run for peers.py, run by LLaMA-Factory's own python (its environment has
its own transformers, and no vlmtune): `python llamafactory_run.py ARGS.json`. It calls LLaMA-Factory's
`run_exp` with those arguments, as `llamafactory-cli train` would, and wraps its SFT trainer to count
what the training batches hold (the same count as vlmtune's and TRL's runs) and to time `train()`
alone, the same span the other tools time. Prints the one RESULT line harness.alternate reads."""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

STARTED = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import count_batch, report  # noqa: E402  (harness needs only the standard library here)


def main() -> None:
    from llamafactory.train.sft.trainer import CustomSeq2SeqTrainer
    from llamafactory.train.tuner import run_exp
    from transformers import TrainerCallback

    seen: dict = {}
    timing: dict = {}

    class FirstStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            timing.setdefault("first_step", time.perf_counter() - STARTED)

    original_loss, original_train = CustomSeq2SeqTrainer.compute_loss, CustomSeq2SeqTrainer.train

    def counting(self, model, inputs, *args, **kwargs):
        if model.training:
            count_batch(seen, inputs, self.processing_class.pad_token_id)
        return original_loss(self, model, inputs, *args, **kwargs)

    def timed(self, *args, **kwargs):
        started = time.perf_counter()
        output = original_train(self, *args, **kwargs)
        timing["seconds"] = time.perf_counter() - started
        timing["losses"] = [h["loss"] for h in self.state.log_history if "loss" in h]
        timing["trainable"] = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        timing["dtype"] = str(next(self.model.parameters()).dtype)
        return output

    CustomSeq2SeqTrainer.compute_loss, CustomSeq2SeqTrainer.train = counting, timed
    # after training it writes a model card, which under transformers 5.6 fails for a plain (not PEFT)
    # model (`create_or_update_model_card` is PEFT's); the card is not part of what is measured
    from llamafactory.train.sft import workflow

    workflow.create_modelcard_and_push = lambda *args, **kwargs: None
    run_exp(json.loads(Path(sys.argv[1]).read_text()), callbacks=[FirstStep()])
    report({"seconds": timing["seconds"], "final_loss": timing["losses"][-1], "first_step": timing["first_step"],
            "trainable": timing["trainable"], "dtype": timing["dtype"], **seen,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


if __name__ == "__main__":
    main()
