"""Decode speed, prefill time and memory of compressed and quantized models against the dense one.

What `factorkit bench-speed` measures (factorkit.eval.speed), for the dense model, the dense model quantized
(int8, int4 in groups of 32), and the model with every targeted linear replaced by random low-rank factors and
by random sparse dictionaries at ratios 0.2 and 0.4, each in float32, with int8 on top, and with int8 on the
LM head (and the embeddings tied to it) too: greedy decode
tokens/s at batch 1 and 8 (64 new tokens), prefill of 512 and 2048 tokens, the bytes each model holds and its
peak resident memory. Random factors of the shapes the methods produce: speed and memory do not depend on the
values (a real compressed folder is measured the same way with `factorkit bench-speed --compare DIR`). One
process, one thread, rows one after the other; resumable (results/speed-<model>.json); writes the
`speed-<model>` section of BENCHMARKS.md.

    python benchmarks/bench_speed.py --model smollm2-135m
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported: one thread, as the table says

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import busy, dictionary_model, lowrank_model  # noqa: E402
from common import Results, machine, write_section  # noqa: E402

import factorkit as fk  # noqa: E402
from factorkit.eval import speed  # noqa: E402
from factorkit.models import load  # noqa: E402

SETTINGS = {"new_tokens": 64, "batch_sizes": [1, 8], "prefill": [512, 2048], "repeats": 3, "group_size": 32}


def variants() -> list[tuple[str, str | None, float | None, str | None]]:
    """(label, factor kind or None, ratio, quantization or None), the dense model first; a scheme ending in
    "+ head" quantizes the LM head (and the embeddings tied to it) too."""
    rows = [("dense", None, None, None), ("dense int8", None, None, "int8"), ("dense int4", None, None, "int4")]
    for ratio in (0.2, 0.4):
        for kind in ("low rank", "dictionaries"):
            for scheme in (None, "int8"):
                rows.append((f"{kind} {ratio}" + (f" + {scheme}" if scheme else ""), kind, ratio, scheme))
    rows.append(("dense int8 + head", None, None, "int8 + head"))
    for ratio in (0.2, 0.4):
        for kind in ("low rank", "dictionaries"):
            rows.append((f"{kind} {ratio} + int8 + head", kind, ratio, "int8 + head"))
    return rows


def loader(model_name: str, kind: str | None, ratio: float | None, scheme: str | None):
    def make():
        model = load(model_name)[0].requires_grad_(False)
        if kind == "low rank":
            model = lowrank_model(model, ratio)
        elif kind == "dictionaries":
            model = dictionary_model(model, ratio)
        if scheme:
            fk.quantize(model, scheme.removesuffix(" + head"), SETTINGS["group_size"], head=scheme.endswith("head"))
        return model
    return make


def report(results: Results, model_name: str) -> None:
    rows = [speed.SpeedRow(**{**{k: v for k, v in r.items() if k != "load"}, "decode_tok_s": {int(k): v for k, v in r["decode_tok_s"].items()},
                              "prefill_s": {int(k): v for k, v in r["prefill_s"].items()}})
            for label, *_ in variants() if (r := results.items.get(label))]
    if not rows:
        return
    result = speed.SpeedResult(rows, SETTINGS["new_tokens"], tuple(SETTINGS["batch_sizes"]),
                               tuple(SETTINGS["prefill"]), SETTINGS["repeats"], threads=1)
    _, header, cells, caption = result.table("")
    load = max(r.get("load") or 0.0 for r in results.items.values())
    from factorkit.report import markdown_table

    write_section(f"speed-{model_name}", f"""## Decode, prefill and memory: {model_name}

`python benchmarks/bench_speed.py --model {model_name}` ({results.measured()}; {results.machine()}), what
`factorkit bench-speed` measures. Random factors at each ratio (low rank at the rank of that parameter count,
dictionaries at rho = 2 by the paper's count; speed and memory do not depend on the values), float32
activations, quantization by `factorkit.quantize` (int8 per row, int4 per 32 numbers) of the blocks' matrices;
`+ head`: the LM head and the embeddings tied to it too (`--quantize-head`). {caption}{busy(load)}

{markdown_table(header, cells)}
""")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--fresh", action="store_true", help="ignore results of an earlier run")
    ap.add_argument("--report", action="store_true", help="only rewrite BENCHMARKS.md")
    args = ap.parse_args()
    results = Results(f"speed-{args.model}", {**SETTINGS, "model": args.model, "threads": torch.get_num_threads()},
                      fresh=args.fresh)
    if not args.report:
        for label, kind, ratio, scheme in variants():
            if label in results:
                continue
            (row,) = speed.compare([(label, loader(args.model, kind, ratio, scheme))],
                                   new_tokens=SETTINGS["new_tokens"], batch_sizes=SETTINGS["batch_sizes"],
                                   prefill=SETTINGS["prefill"], repeats=SETTINGS["repeats"])
            results.put(label, {**row.as_dict(), "load": os.getloadavg()[0]})
            print(label, {k: v for k, v in row.as_dict().items() if k != "label"}, flush=True)
            report(results, args.model)
    report(results, args.model)


if __name__ == "__main__":
    main()
