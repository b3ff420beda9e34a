"""Side by side, one process: the chunked linear + cross-entropy loss vs transformers' ``logits_to_keep`` path.

    python -m bench.bench_loss [--repeats 6]

The bundled SmolLM2-135M with easysft's single-process defaults (lean activations, deferred LM-head gradient),
packed rows of 8 bench samples (bench/data.py, bench_train's tokenization), forward + backward per micro-batch,
the two loss paths interleaved so machine load hits both alike; prints the median seconds of each and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=6)
    args = parser.parse_args(argv)

    import easysft.loss as loss_module
    from bench.bench_train import tokenized
    from bench.data import make_rows
    from easysft.data.collate import pack
    from easysft.kernels.lean_ops import apply_lean_ops
    from easysft.models.load import load_model_and_tokenizer

    model, tokenizer, _ = load_model_and_tokenizer("bundled")
    apply_lean_ops(model, defer_head_weight_grad=True)
    model.train()
    rows, _ = make_rows(8 * args.repeats, 0)
    samples = tokenized(rows, tokenizer)
    batches = [pack(samples[i:i + 8]) for i in range(0, len(samples), 8)]
    chunked_head = loss_module.chunkable_head

    def step(batch, chunked: bool) -> float:
        loss_module.chunkable_head = chunked_head if chunked else (lambda m: None)
        started = time.perf_counter()
        out = loss_module.supervised_loss_sum(model, batch)
        out.loss_sum.backward()
        elapsed = time.perf_counter() - started
        model.zero_grad(set_to_none=True)
        return elapsed

    step(batches[0], True), step(batches[0], False)  # warm-up both
    times = {True: [], False: []}
    for k, batch in enumerate(batches):
        for chunked in ((True, False) if k % 2 == 0 else (False, True)):
            times[chunked].append(step(batch, chunked))
    loss_module.chunkable_head = chunked_head
    new, old = statistics.median(times[True]), statistics.median(times[False])
    tokens = statistics.median(b["input_ids"].numel() for b in batches)
    print(f"packed rows of 8 samples (median {tokens:.0f} tokens), {len(batches)} rows, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads (shared machine: ratios, not times)")
    print(f"forward+backward median: chunked loss {new:.3f} s, logits_to_keep path {old:.3f} s, "
          f"ratio new/old {new / old:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
