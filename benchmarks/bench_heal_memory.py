"""Peak memory of a healing step: the micro-batch in one pass against in pieces of rows.

A healing (or DSFormer, pretraining) step on token ids holds the logits of the
micro-batch several times over: the student's, the cross-entropy's and the
distillation's log-softmaxes, the teacher's, their gradients. With a 262k
vocabulary (Gemma-3) at 4 x 512 tokens that is most of the process. The
training loop runs each micro-batch in pieces whose logits stay within
``factorkit.training.loop.MAX_LOGITS`` (the same gradient, each piece weighted
by its share of the rows). Each setting runs in its own process (peak resident
memory is per process): the dense model distilled from a copy of itself on 4
windows of 512 tokens of the general corpus's evaluation split, next-token loss
plus KL, for ``--steps`` optimizer steps, training only the last block's MLP
down-projection (so that the optimizer's state stays small and the difference
is the loss's).

    python benchmarks/bench_heal_memory.py --model gemma3-270m
    python benchmarks/bench_heal_memory.py --model smollm2-135m
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Results, machine, write_section  # noqa: E402

import factorkit as fk  # noqa: E402
from factorkit.data import eval_tokens  # noqa: E402
from factorkit.report import markdown_table  # noqa: E402
from factorkit.surgery import find_blocks  # noqa: E402
from factorkit.training import TrainConfig, model_loss, train  # noqa: E402
from factorkit.training.loop import MAX_LOGITS, rows_per_piece  # noqa: E402

SETTINGS = {"one pass": None, "pieces (default)": MAX_LOGITS}


def child(model_name: str, max_logits: int | None, steps: int) -> dict:
    """One process's run: the step's seconds and the process's peak resident memory."""
    import copy

    model, tok = fk.models.load(model_name)
    teacher = copy.deepcopy(model).eval()
    rows = eval_tokens(tok, "general", 512, 4, 0)
    down = find_blocks(model)[1][-1].mlp.down_proj.weight
    named = [(n, p) for n, p in model.named_parameters() if p is down]
    config = TrainConfig(steps=steps, batch_size=4, warmup=0, distill=1.0, lr=5e-5)
    t0 = time.perf_counter()
    result = train(model, rows, named, config, lambda m, b: model_loss(m, b, teacher, 1.0, 2.0), progress=False,
                   max_logits=max_logits)
    return {"seconds_per_step": (time.perf_counter() - t0) / steps, "losses": result.losses,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "rows_per_pass": rows_per_piece(model, rows, max_logits) or config.batch_size,
            "vocab": model.config.vocab_size}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.model, SETTINGS[args.child], args.steps)))
        return
    results = Results(f"heal-memory-{args.model}", {"model": args.model, "steps": args.steps})
    if not args.report:
        for name in SETTINGS:
            if name not in results:
                out = subprocess.run([sys.executable, __file__, "--model", args.model, "--steps", str(args.steps),
                                      "--child", name], check=True, capture_output=True, text=True).stdout
                results.put(name, json.loads(out.strip().splitlines()[-1]))
    rows = []
    one = results["one pass"] if "one pass" in results else None
    for name in SETTINGS:
        if name not in results:
            continue
        r = results[name]
        rows.append([name, r["rows_per_pass"], f"{r['peak_rss_gib']:.2f}", f"{r['seconds_per_step']:.1f}",
                     f"{r['peak_rss_gib'] / one['peak_rss_gib']:.2f}x" if one else "-",
                     " / ".join(f"{x:.5f}" for x in r["losses"])])
    body = (f"## Healing memory: {args.model}\n\n`python benchmarks/bench_heal_memory.py --model {args.model}`, "
            f"{results.measured()}, {results.machine()}.\n\n"
            f"{__doc__.split(chr(10) + chr(10))[1]}\n\n"
            + markdown_table(["setting", "rows per pass", "peak RSS (GiB)", "s per step", "vs one pass",
                              "step losses"], rows))
    write_section(f"heal-memory-{args.model}", body)
    print(body)


if __name__ == "__main__":
    main()
