"""One ms-swift training run for peers.py, run by ms-swift's own python (its environment has its own
transformers, and no vlmtune): `python swift_run.py ARGS.json`. It calls ms-swift's `sft_main` with those
arguments, as `swift sft` would, and wraps its Seq2SeqTrainer to count what the training batches hold
(the same count as the other runs) and to time `train()` alone, the span the other tools time. Prints
the one RESULT line harness.run_child reads."""

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
    from swift import SftArguments, sft_main
    from swift.trainers.seq2seq_trainer import Seq2SeqTrainer
    from transformers import TrainerCallback

    seen: dict = {}
    timing: dict = {}

    class FirstStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            timing.setdefault("first_step", time.perf_counter() - STARTED)

    original_loss, original_train = Seq2SeqTrainer.compute_loss, Seq2SeqTrainer.train

    def counting(self, model, inputs, *args, **kwargs):
        if model.training:
            count_batch(seen, inputs, self.template.tokenizer.pad_token_id)
        return original_loss(self, model, inputs, *args, **kwargs)

    def timed(self, *args, **kwargs):
        self.add_callback(FirstStep())  # sft_main takes no callbacks argument
        started = time.perf_counter()
        output = original_train(self, *args, **kwargs)
        timing["seconds"] = time.perf_counter() - started
        timing["losses"] = [h["loss"] for h in self.state.log_history if "loss" in h]
        timing["trainable"] = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        timing["dtype"] = str(next(self.model.parameters()).dtype)
        return output

    Seq2SeqTrainer.compute_loss, Seq2SeqTrainer.train = counting, timed
    sft_main(SftArguments(**json.loads(Path(sys.argv[1]).read_text())))
    report({"seconds": timing["seconds"], "final_loss": timing["losses"][-1], "first_step": timing["first_step"],
            "trainable": timing["trainable"], "dtype": timing["dtype"], **seen,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


if __name__ == "__main__":
    main()
