"""CoSpaDi's dictionary solver: the compiled kernels (factorkit.kernels, solver.cpp) against the torch version,
side by side in one process.

The four projection shapes of SmolLM2-135M's block 5 (q, k, up, down), whitened by their calibration Gram on
the general corpus, at ratio 0.2 (k atoms, s = k/2 nonzeros per row, the paper's count). For each: one
Batch-OMP coding of every row from the SVD start's dictionary, one K-SVD sweep, and the whole fit CoSpaDi and
`auto` run (`sparse_dictionary`, 8 alternations, refresh "doubling", SVD start), each with the compiled
kernels and with them switched off (FACTORKIT_KERNELS=0: the torch version), at one and two threads; best of
two wall times. Beside the times, what the two paths reach: the share of rows whose OMP support is the same, and
each path's relative error after the fit. Resumable: rerun to finish an interrupted run.

    python benchmarks/bench_solver.py            # measure what is missing, then rewrite BENCHMARKS.md
    python benchmarks/bench_solver.py --report   # only rewrite BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Results, compiled_kernels_off, machine, write_section  # noqa: E402
from bench_cospadi import block_matrices  # noqa: E402

import factorkit as fk  # noqa: E402
from factorkit import kernels  # noqa: E402
from factorkit.data import calibration_tokens  # noqa: E402
from factorkit.report import markdown_table  # noqa: E402
from factorkit.solvers.dictionary import (batch_omp, codes_to_dense, dictionary_budget, ksvd_sweep,  # noqa: E402
                                          sparse_dictionary, svd_start)
from factorkit.solvers.whitening import cholesky_factor  # noqa: E402

MODEL = "smollm2-135m"
MATRICES = ("self_attn.q_proj", "self_attn.k_proj", "mlp.up_proj", "mlp.down_proj")
RATIO = 0.2
ITERATIONS = 8
THREADS = (1, 2)
CALIB_SAMPLES = 8


def best(fn, repeats: int = 2) -> tuple[float, object]:
    """(best wall time, the last result) of ``repeats`` calls."""
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def problem(W: torch.Tensor, G: torch.Tensor, k: int, s: int):
    """The whitened signals (one per row, float32), the SVD start's dictionary (unit rows) and codes."""
    Y = (W.double() @ cholesky_factor(G).factor)  # (out, in): row o is L.T w_o
    Y = Y / Y.norm()
    top, idx, val = svd_start(Y, k, s)
    D = torch.randn(k, Y.shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    D[: top.shape[0]] = top
    D = D / D.norm(dim=1, keepdim=True)
    return Y.float(), D.float(), idx, val.float()


def measure_one(W: torch.Tensor, G: torch.Tensor, threads: int) -> dict:
    out_f, in_f = W.shape
    k, s = dictionary_budget(in_f, out_f, RATIO)
    Y, D, idx0, val0 = problem(W, G, k, s)
    row = {"k": k, "s": s, "signals": out_f}
    torch.set_num_threads(threads)
    for path in ("compiled", "torch"):
        with compiled_kernels_off() if path == "torch" else contextlib.nullcontext():
            row[f"omp_{path}"], (idx, val) = best(lambda: batch_omp(D @ D.T, Y @ D.T, s))
            row[f"codes_{path}"] = idx

            def sweep():
                residual = Y - codes_to_dense(idx0, val0, k).T @ D
                atoms, values = D.clone(), val0.clone()
                t = time.perf_counter()
                ksvd_sweep(residual, atoms, idx0, values)
                return time.perf_counter() - t

            row[f"ksvd_{path}"] = min(sweep() for _ in range(2))
            row[f"fit_{path}"], fit = best(lambda: sparse_dictionary([W], k, s, gram=G, iterations=ITERATIONS,
                                                                     refresh="doubling", start="svd")[0])
            row[f"error_{path}"] = fit.errors[-1]
    a, b = row.pop("codes_compiled"), row.pop("codes_torch")
    row["same_support"] = float(sum(set(x.tolist()) == set(y.tolist()) for x, y in zip(a, b)) / a.shape[0])
    return row


def measure(results: Results) -> None:
    if not all(f"{t}/{name}" in results for t in THREADS for name in MATRICES):
        base, tok = fk.models.load(MODEL)
        calib = calibration_tokens(tok, "general", CALIB_SAMPLES, 512)
        mats = block_matrices(base, calib, MATRICES)
        for threads in THREADS:
            for name in MATRICES:
                key = f"{threads}/{name}"
                if key in results:
                    continue
                results.put(key, measure_one(*mats[name], threads))
                print(key, {k: (round(v, 4) if isinstance(v, float) else v) for k, v in results[key].items()},
                      flush=True)


def report(results: Results) -> None:
    rows = []
    for threads in THREADS:
        for name in MATRICES:
            r = results.items.get(f"{threads}/{name}")
            if not r:
                continue
            cell = lambda part: (f"{r[part + '_compiled']:.2f} / {r[part + '_torch']:.2f} "  # noqa: E731
                                 f"(**{r[part + '_torch'] / r[part + '_compiled']:.1f}x**)")
            rows.append([threads, f"{name} (k={r['k']}, s={r['s']}, {r['signals']} rows)", cell("omp"), cell("ksvd"),
                         cell("fit"), f"{100 * r['same_support']:.1f}%",
                         f"{r['error_compiled']:.5f} / {r['error_torch']:.5f}"])
    ext = kernels.dictionary()
    path = "not built" if ext is None else f"built, {ext.isa()} path"
    where = re.sub(r", \d+ threads?", "", results.machine())  # each row names its thread count
    body = f"""## CoSpaDi's solver: compiled kernels against torch

`python benchmarks/bench_solver.py` ({results.measured()}; {where}; compiled kernels: {path}).
Block 5 of {MODEL}, each projection whitened by its calibration Gram ({CALIB_SAMPLES} windows of 512 tokens of
the general corpus), at ratio {RATIO}. Seconds, compiled / torch (FACTORKIT_KERNELS=0), and how many times
faster the compiled path is: one Batch-OMP coding of every row (from the SVD start's dictionary), one K-SVD
sweep, and the whole {ITERATIONS}-alternation fit (`sparse_dictionary`, refresh doubling, SVD start: what
`cospadi` and `auto` run per matrix); best of two, side by side in one process. *same support*: rows whose OMP
support the two paths agree on (float32; they round differently, so near-ties can go either way); *error*: the
fit's relative whitened error on each path.

""" + markdown_table(["threads", "matrix", "OMP (s)", "K-SVD sweep (s)", f"fit, T={ITERATIONS} (s)", "same support",
                      "error compiled / torch"], rows)
    write_section("solver", body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--report", action="store_true", help="only rewrite BENCHMARKS.md")
    ap.add_argument("--fresh", action="store_true", help="ignore results of an earlier run")
    args = ap.parse_args()
    results = Results("solver", {"model": MODEL, "ratio": RATIO, "iterations": ITERATIONS}, fresh=args.fresh)
    if not args.report:
        results.put("machine", {"text": machine()})
        measure(results)
    report(results)


if __name__ == "__main__":
    main()
