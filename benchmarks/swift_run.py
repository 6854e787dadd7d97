"""One ms-swift training run for peers.py, run by ms-swift's own python (its environment has its own
transformers, and no vlmtune): `python swift_run.py ARGS.json`. It calls ms-swift's `sft_main` with those
arguments, as `swift sft` would, and wraps its Seq2SeqTrainer to count what the training batches hold
(the same count as the other runs) and to time `train()` alone, the span the other tools time. Prints
the one RESULT line harness.run_child reads."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

STARTED = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import instrument, report_peer  # noqa: E402  (harness needs only the standard library here)


def main() -> None:
    from swift import SftArguments, sft_main
    from swift.trainers.seq2seq_trainer import Seq2SeqTrainer

    seen, timing, first_step = instrument(Seq2SeqTrainer, lambda trainer: trainer.template.tokenizer.pad_token_id,
                                          STARTED)
    timed = Seq2SeqTrainer.train

    def with_first_step(self, *args, **kwargs):
        self.add_callback(first_step)  # sft_main takes no callbacks argument
        return timed(self, *args, **kwargs)

    Seq2SeqTrainer.train = with_first_step
    sft_main(SftArguments(**json.loads(Path(sys.argv[1]).read_text())))
    report_peer(seen, timing)


if __name__ == "__main__":
    main()
