"""DSFormer's exported layer: latency against nn.Linear and LowRankLinear.

At ratio 0.3 (the DSFormer comparison's budget), on the SmolLM2 shapes, the
exported DenseSparseLinear (a DictionaryLinear with a 2:4 support over k)
against the dense layer and LowRankLinear at the same parameter count: decode
(1 token) and prefill (16 to 512 tokens), every kernel. On the CPU in float32;
with ``--device cuda`` in bfloat16, including the 2:4 semi-structured kernel.

Resumable: results in benchmarks/results/dsformer[-cuda].json; writes the
`dsformer-latency[-cuda]` section of BENCHMARKS.md.

    python benchmarks/bench_dsformer.py [--device cuda] [--fresh]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Results, best_time, machine, today, write_section  # noqa: E402

from factorkit.factors import DenseSparseLinear, LowRankLinear  # noqa: E402
from factorkit.report import markdown_table  # noqa: E402
from factorkit.solvers import rank_for_ratio  # noqa: E402
from factorkit.solvers.sparsity import Pattern, dense_sparse_budget  # noqa: E402

RATIO = 0.3
SHAPES = {"q/o 576x576": (576, 576), "k/v 192x576": (192, 576), "gate/up 1536x576": (1536, 576),
          "down 576x1536": (576, 1536)}
TOKENS = (1, 16, 64, 512)


def bench_latency(results: Results, device: str, dtype: torch.dtype) -> list[str]:
    gen = torch.Generator().manual_seed(0)
    kernels = ["gather", "sparse", "codes"] + (["semi24"] if device != "cpu" else [])
    for label, (out_f, in_f) in SHAPES.items():
        k, s = dense_sparse_budget(in_f, out_f, RATIO, pattern=Pattern(2, 4))
        r = rank_for_ratio(out_f, in_f, RATIO)
        dense = nn.Linear(in_f, out_f, bias=False)
        lowrank = LowRankLinear.from_factors(torch.randn(out_f, r, generator=gen), torch.randn(r, in_f, generator=gen))
        layer = DenseSparseLinear.from_factors(torch.randn(out_f, k, generator=gen), torch.randn(k, in_f, generator=gen),
                                               s, pattern="2:4")
        compact = layer.export()
        dense, lowrank, compact = (m.to(device, dtype) for m in (dense, lowrank, compact))
        for tokens in TOKENS:
            key = f"latency/{label}/{tokens}"
            if key in results:
                continue
            x = torch.randn(1, tokens, in_f, generator=gen).to(device, dtype)
            repeats = 200 if tokens == 1 else 30
            row = {"dense": best_time(dense, x, repeats), "lowrank": best_time(lowrank, x, repeats)}
            for kernel in kernels:
                compact.kernel = kernel
                row[kernel] = best_time(compact, x, repeats)
            compact.kernel = "auto"
            row["auto"] = best_time(compact, x, repeats)
            row["params"] = {"dense": out_f * in_f, "lowrank": r * (out_f + in_f), "dsformer": compact.param_count()}
            results.put(key, row)
            print(key, {k_: (f"{v * 1e6:.0f}us" if isinstance(v, float) else v) for k_, v in row.items()}, flush=True)
    return kernels


def latency_section(results: Results, kernels: list[str]) -> str:
    rows = []
    for label in SHAPES:
        for tokens in TOKENS:
            r = results.items.get(f"latency/{label}/{tokens}")
            if r:
                us = [f"{r[k] * 1e6:.0f}" for k in ["dense", "lowrank"] + kernels + ["auto"]]
                best = min(kernels, key=lambda k: r[k])
                rows.append([label, tokens, r["params"]["dsformer"], r["params"]["lowrank"]] + us
                            + [best, f"{r[best] / r['lowrank']:.2f}x"])
    return markdown_table(["shape", "tokens", "params dsformer", "params low-rank", "nn.Linear", "LowRankLinear"]
                          + kernels + ["auto", "fastest", "fastest / low-rank"], rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--fresh", action="store_true", help="ignore results of an earlier, interrupted run")
    args = ap.parse_args()
    gpu = args.device != "cpu"
    dtype = torch.bfloat16 if gpu else torch.float32
    where = torch.cuda.get_device_name(args.device) if gpu else machine()
    suffix = "-cuda" if gpu else ""
    results = Results(f"dsformer{suffix}", {"device": where, "dtype": str(dtype), "ratio": RATIO}, fresh=args.fresh)
    kernels = bench_latency(results, args.device, dtype)
    write_section(f"dsformer-latency{suffix}", f"### DSFormer layer latency{' on ' + where if gpu else ''}\n\n"
                  f"`python benchmarks/bench_dsformer.py{' --device ' + args.device if gpu else ''}`, {today()}, "
                  f"{where if not gpu else 'torch ' + torch.__version__}. Microseconds per call (best of many"
                  f"{', synchronised' if gpu else ''}), batch 1, {str(dtype).replace('torch.', '')}, ratio {RATIO}: "
                  "the exported DenseSparseLinear (2:4 support over k atoms) against nn.Linear and LowRankLinear "
                  "at the same parameter count.\n\n" + latency_section(results, kernels))


if __name__ == "__main__":
    main()
