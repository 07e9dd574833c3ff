"""CoSpaDi on SmolLM2-135M, beside the low-rank baselines, in one run.

1. Solver, on the q, up and down projections of block 5 (calibrated on the
   dense model, ratio 0.2): our Batch-OMP against scikit-learn's
   ``orthogonal_mp_gram`` on the same Gram and correlations (time, identical
   supports, residual), and the whitened error after T = 5, 15, 30, 60
   alternations for the "doubling" and "every" refresh schedules, beside
   SVD-LLM's error at the same parameter count.
2. DictionaryLinear latency (every kernel) against nn.Linear and
   LowRankLinear at equal parameter count (ratio 0.2), SmolLM2 shapes,
   decode (1 token) and prefill (512 tokens).
3. Whole model: perplexity and compression wall time of SVD, ASVD, SVD-LLM
   and CoSpaDi (per layer, and group=2) at ratios 0.2 / 0.3 / 0.4; the
   CoSpaDi 0.2 model is saved, reloaded and its logits compared.

Resumable: results go to benchmarks/results/cospadi.json after every item, and
a CoSpaDi item cut off mid-model resumes from its finished blocks (kept in
benchmarks/results/cospadi-finished/ until the item is saved).
Writes the `cospadi` section of BENCHMARKS.md and cospadi_error_vs_T.png.

Calibration and held-out text: the general corpus's two splits by default; ``--calib shakespeare``
the calibration and held-out plays (results, section, plot and finished blocks without the
``-general`` suffix).

    python benchmarks/bench_cospadi.py [--calib general|shakespeare] [--max-chunks 16]
        [--only solver,latency,model,report] [--fresh]

`--only report` rewrites the section and the plot from the stored results.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (CALIB_TEXT, RESULTS, Results, add_calib_argument, calib_name, held_out,  # noqa: E402
                    machine, reload_max_abs_diff, run_point, write_section)

import factorkit as fk  # noqa: E402
from factorkit.eval.latency import time_kernels  # noqa: E402
from factorkit.data import calibration_tokens  # noqa: E402
from factorkit.calibration import linear_inputs, relative_output_error  # noqa: E402
from factorkit.factors import DictionaryLinear, LowRankLinear  # noqa: E402
from factorkit.report import markdown_table  # noqa: E402
from factorkit.solvers import rank_for_ratio, whitened_svd  # noqa: E402
from factorkit.solvers.dictionary import batch_omp, dictionary_budget, sparse_dictionary  # noqa: E402
from factorkit.solvers.whitening import cholesky_factor  # noqa: E402

RATIOS = (0.2, 0.3, 0.4)
BLOCK = 5
SOLVER_MATRICES = ("self_attn.q_proj", "mlp.up_proj", "mlp.down_proj")
T_VALUES = (5, 15, 30, 60)
BASELINES = {"svd": fk.SVDConfig, "asvd": fk.ASVDConfig, "svdllm": fk.SVDLLMConfig}
# The sections were measured with dictionaries started from random weight rows, before the SVD start became
# the default; they keep that start so that the command reproduces them.
COSPADI = {"cospadi": {"start": "signals"}, "cospadi-g2": {"group": 2, "start": "signals"}}
LATENCY_SHAPES = {"q/o 576x576": (576, 576), "k/v 192x576": (192, 576), "gate/up 1536x576": (1536, 576),
                  "down 576x1536": (576, 1536)}
LATENCY_TOKENS = (1, 16, 64, 512)


def block_matrices(base, calib, targets: tuple[str, ...] = SOLVER_MATRICES) -> dict:
    """Weights and input Grams of block BLOCK's ``targets`` (dense model), by their name in the block."""
    found = linear_inputs(base, calib, blocks=(BLOCK,), targets=targets)
    return {name.split(f".{BLOCK}.", 1)[1]: (W, stats.gram) for name, (W, stats) in found.items()}


def whitened_problem(W: torch.Tensor, G: torch.Tensor, k: int, seed: int = 0):
    """Y = L.T W.T, and the solver's initial dictionary (k random columns of Y), as rows."""
    L = cholesky_factor(G).factor
    Y = (L.T @ W.double().T).T  # (out, in): one signal per row
    Y = Y / Y.norm()
    gen = torch.Generator().manual_seed(seed)
    D = Y[torch.randperm(Y.shape[0], generator=gen)[:k]]
    return Y, D / D.norm(dim=1, keepdim=True)


def bench_solver(results: Results, mats: dict) -> None:
    from sklearn.linear_model import orthogonal_mp_gram

    for name, (W, G) in mats.items():
        out_f, in_f = W.shape
        k, s = dictionary_budget(in_f, out_f, 0.2)
        key = f"omp/{name}"
        if key not in results:
            Y, D = whitened_problem(W, G, k)
            t = time.perf_counter()
            sk = orthogonal_mp_gram((D @ D.T).numpy(), (D @ Y.T).numpy(), n_nonzero_coefs=s)  # float64
            sk_s = time.perf_counter() - t
            sk = torch.from_numpy(sk)  # (k, B)
            res_sk = (Y.T - D.T @ sk).norm(dim=0)
            # signals the initial dictionary holds as atoms are fitted exactly by one atom; the other s - 1
            # picks are then ties at rounding level with coefficient 0, which each solver breaks its own way
            scale = Y.norm(dim=1)
            exact = res_sk <= 1e-9 * scale
            row = {"k": k, "s": s, "signals": out_f, "sklearn_s": sk_s, "residual_sklearn": float(res_sk.norm()),
                   "exact_fits": int(exact.sum())}
            for label, dtype in (("f32", torch.float32), ("f64", torch.float64)):
                Yd, Dd = Y.to(dtype), D.to(dtype)
                t = time.perf_counter()
                idx, val = batch_omp(Dd @ Dd.T, Yd @ Dd.T, s)
                row[f"ours_{label}_s"] = time.perf_counter() - t
                ours = torch.zeros(k, out_f, dtype=torch.float64).scatter_(0, idx.T, val.T.double())
                same = sum(set(idx[b].tolist()) == set(sk[:, b].nonzero().flatten().tolist())
                           for b in range(out_f) if not exact[b])
                res = (Y.T - D.T @ ours).norm(dim=0)
                row[f"same_support_{label}"] = same / max(out_f - int(exact.sum()), 1)
                row[f"residual_{label}"] = float(res.norm())
                tol = 1e-6 if dtype == torch.float32 else 1e-12  # relative to the signal's norm
                row[f"worse_columns_{label}"] = int(((res > res_sk * (1 + 1e-6) + tol * scale) & ~exact).sum())
            results.put(key, row)
            print(key, results[key], flush=True)
        r = rank_for_ratio(out_f, in_f, 0.2)
        if f"svdllm-error/{name}" not in results:
            f = whitened_svd(W, G, r)
            results.put(f"svdllm-error/{name}", {"rank": r, "error": relative_output_error(W, f.U @ f.V, G)})
        for refresh in ("doubling", "every"):
            for T in T_VALUES:
                key = f"curve/{name}/{refresh}/{T}"
                if key in results:
                    continue
                t = time.perf_counter()
                fit = sparse_dictionary([W], k, s, gram=G, iterations=T, refresh=refresh, start="signals")[0]
                results.put(key, {"error": fit.errors[-1], "seconds": time.perf_counter() - t,
                                  "omp_s": fit.omp_seconds, "ksvd_s": fit.ksvd_seconds})
                print(key, results[key], flush=True)


def bench_latency(results: Results, device: str = "cpu", dtype: torch.dtype = torch.float32) -> None:
    gen = torch.Generator().manual_seed(0)
    for label, (out_f, in_f) in LATENCY_SHAPES.items():
        k, s = dictionary_budget(in_f, out_f, 0.2)
        r = rank_for_ratio(out_f, in_f, 0.2)
        dense = nn.Linear(in_f, out_f, bias=False)
        lowrank = LowRankLinear.from_factors(torch.randn(out_f, r, generator=gen), torch.randn(r, in_f, generator=gen))
        idx = torch.stack([torch.randperm(k, generator=gen)[:s] for _ in range(out_f)])
        dic = DictionaryLinear.from_codes(torch.randn(k, in_f, generator=gen), idx, torch.randn(out_f, s, generator=gen))
        dense, lowrank, dic = (m.to(device, dtype) for m in (dense, lowrank, dic))
        for tokens in LATENCY_TOKENS:
            key = f"latency/{label}/{tokens}"
            if key in results:
                continue
            x = torch.randn(1, tokens, in_f, generator=gen).to(device, dtype)
            row = time_kernels(dense, lowrank, dic, ("gather", "sparse", "codes", "dense"), x, prefix="dict-")
            row["auto-kernel"] = dic.pick_kernel(tokens)
            row["params"] = {"dense": out_f * in_f, "lowrank": r * (out_f + in_f), "dict": k * in_f + s * out_f}
            results.put(key, row)
            print(key, {k_: (f"{v * 1e6:.0f}us" if isinstance(v, float) else v) for k_, v in row.items()}, flush=True)


def latency_table(results: Results) -> str:
    rows = []
    for label in LATENCY_SHAPES:
        for tokens in LATENCY_TOKENS:
            r = results.items.get(f"latency/{label}/{tokens}")
            if not r:
                continue
            us = lambda v: f"{v * 1e6:.0f}"  # noqa: E731
            rows.append([label, tokens, us(r["dense"]), us(r["lowrank"])]
                        + [us(r[f"dict-{k}"]) for k in ("gather", "sparse", "codes", "dense", "auto")]
                        + [f"{r['dict-auto'] / r['lowrank']:.2f}x"])
    return markdown_table(["shape", "tokens", "nn.Linear", "LowRankLinear", "gather", "sparse (CSR)", "codes (GEMM)",
                           "dense W", "auto", "auto / low-rank"], rows) if rows else ""


def bench_model(results: Results, base, tok, job: fk.CompressJob, ratios=RATIOS, cospadi=tuple(COSPADI)) -> None:
    def evaluate(key: str, config, check_reload: bool = False) -> None:
        if key in results and results[key]["compress_s"] is not None:
            return
        model, report = run_point(base, tok, job, config)
        c = report.compression
        row = {"compress_s": c.seconds, "ratio_targeted": c.summary.ratio_targeted,
               "ratio_storage": c.summary.ratio_targeted_storage, "ratio_model": c.summary.ratio_model}
        fit = c.fit if isinstance(config, fk.CoSpaDiConfig) else {}  # per matrix
        restored = [f for f in fit.values() if f.get("restored")]
        if restored:  # resumed after an interruption: add what the finished groups took
            row["compress_s"] += sum(f["seconds"] for f in restored)
            row["resumed"] = True
        if fit:
            curves = torch.tensor([f["errors"] for f in fit.values()])
            row["mean_error_curve"] = curves.mean(0).tolist()
            row["omp_s"] = sum(f["omp_s"] for f in fit.values())
            row["ksvd_s"] = sum(f["ksvd_s"] for f in fit.values())
        if check_reload:
            row["reload_max_abs_diff"] = reload_max_abs_diff(model, tok, job)
        row["ppl"] = report.perplexity_after.perplexity
        results.put(key, row)
        if getattr(config, "checkpoint_dir", None):  # the item is saved: its finished blocks are no longer needed
            shutil.rmtree(config.checkpoint_dir, ignore_errors=True)
        print(key, {k: v for k, v in row.items() if k != "mean_error_curve"}, flush=True)

    if "dense" not in results:
        results.put("dense", {"ppl": held_out(base, tok, job).perplexity.perplexity})
    for ratio in ratios:
        for name, cls in BASELINES.items():
            evaluate(f"model/{name}/{ratio}", cls(ratio=ratio))
        for name in cospadi:
            # the finished blocks are kept, so a run cut off mid-model resumes where it stopped
            finished = RESULTS / calib_name("cospadi-finished", job.calib) / f"{name}-{ratio}"
            evaluate(f"model/{name}/{ratio}",
                     fk.CoSpaDiConfig(ratio=ratio, **COSPADI[name], checkpoint_dir=str(finished)),
                     check_reload=(name == "cospadi" and ratio == 0.2))


def report(results: Results, calib_text: str) -> None:
    suffix = calib_name("", calib_text)  # "" for the plays, "-general" ...
    calibrated, held = CALIB_TEXT[calib_text]
    sections = []
    omp_rows = []
    for name in SOLVER_MATRICES:
        r = results.items.get(f"omp/{name}")
        if r and "exact_fits" in r:
            for label in ("f32", "f64"):
                omp_rows.append([f"{name} (k={r['k']}, s={r['s']}, {r['signals']} signals, "
                                 f"{r['exact_fits']} fitted exactly)",
                                 {"f32": "float32", "f64": "float64"}[label], f"{r[f'ours_{label}_s']:.2f} s",
                                 f"{r['sklearn_s']:.2f} s", f"{r['sklearn_s'] / r[f'ours_{label}_s']:.1f}x",
                                 f"{r[f'same_support_{label}']:.1%}",
                                 f"{r[f'residual_{label}'] / r['residual_sklearn']:.6f}",
                                 f"{r[f'worse_columns_{label}']}"])
    if omp_rows:
        sections.append("### Sparse coding: Batch-OMP against scikit-learn\n\nSame Gram matrix and correlations "
                        "(the solver's initial dictionary on the whitened weights of block 5, ratio 0.2); "
                        "scikit-learn's `orthogonal_mp_gram` runs in float64. The initial dictionary holds k of "
                        "the signals themselves, which one atom fits exactly; their remaining picks are ties "
                        "with coefficient 0, so supports are compared on the other signals. \"worse columns\" "
                        "counts, among those other signals, the ones whose residual exceeds scikit-learn's by more than 1e-6 relative plus "
                        "rounding (1e-6 of the signal's norm in float32, 1e-12 in float64).\n\n" + markdown_table(
                            ["matrix", "ours in", "factorkit", "scikit-learn", "speed-up",
                             "identical supports (not exact fits)",
                             "residual ours / sklearn", "worse columns"], omp_rows))
    curve_rows = []
    fig, axes = plt.subplots(1, len(SOLVER_MATRICES), figsize=(4 * len(SOLVER_MATRICES), 3.2))
    for ax, name in zip(axes, SOLVER_MATRICES):
        base = results.items.get(f"svdllm-error/{name}")
        for refresh in ("doubling", "every"):
            pts = [(T, results.items[f"curve/{name}/{refresh}/{T}"]) for T in T_VALUES
                   if f"curve/{name}/{refresh}/{T}" in results]
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1]["error"] for p in pts], marker="o", label=f"cospadi ({refresh})")
            done = dict(pts)
            curve_rows.append([name, refresh] + [f"{done[T]['error']:.4f} ({done[T]['seconds']:.1f} s)"
                                                 if T in done else "not run" for T in T_VALUES])
        if base:
            ax.axhline(base["error"], color="gray", ls="--", label="svdllm")
            curve_rows.append([name, f"svdllm (rank {base['rank']})", f"{base['error']:.4f}", "", "", ""])
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("alternations T")
        ax.set_ylabel("relative output error")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / f"cospadi{suffix}_error_vs_T.png", dpi=120)
    plt.close(fig)
    if curve_rows:
        sections.append("### Error against alternations T\n\nRelative calibration output error "
                        "||X(W - W')^T|| / ||X W^T|| of block 5 at ratio 0.2 (seconds in brackets, one matrix). "
                        "`every` re-runs OMP at each alternation as the paper does; `doubling` (the default) at "
                        "0, 1, 2, 4, 8, ... and the last, with a K-SVD sweep at every alternation.\n\n"
                        + markdown_table(["matrix", "schedule"] + [f"T={T}" for T in T_VALUES], curve_rows)
                        + f"\n\n![error vs T](benchmarks/results/cospadi{suffix}_error_vs_T.png)")
    lat = latency_table(results)
    if lat:
        sections.append("### DictionaryLinear latency\n\nMicroseconds per call (best of many), batch 1, float32, "
                        "ratio 0.2 for both factorizations (equal parameter count). `auto` is what the module "
                        "uses: the CSR kernel up to 64 tokens, the dense code GEMM beyond.\n\n" + lat)
    dense = results.items.get("dense")
    model_rows = []
    for name in list(BASELINES) + list(COSPADI):
        cells = []
        for ratio in RATIOS:
            r = results.items.get(f"model/{name}/{ratio}")
            svdllm = results.items.get(f"model/svdllm/{ratio}")
            if r is None:
                cells.append("not run")
                continue
            vs = f" ({r['ppl'] / svdllm['ppl']:.2f}x svdllm)" if svdllm and name.startswith("cospadi") else ""
            cells.append(f"{r['ppl']:.2f}{vs}" if r["ppl"] < 1e4 else f"{r['ppl']:.3g}")
        times = [results.items.get(f"model/{name}/{ratio}") for ratio in RATIOS]
        # a time is None where the run shared the cores with other work (rerun it); "contended": true keeps
        # the time but marks it as taken while other work shared the two cores
        cells += [(f"{t['compress_s']:.0f} s" + (" *" if t.get("contended") else "")
                   + (" †" if t.get("resumed") else ""))
                  if t and t["compress_s"] is not None else "" for t in times]
        model_rows.append([name] + cells)
    if dense and model_rows:
        extra = ""
        if any(r.get("contended") for key, r in results.items.items() if key.startswith("model/")):
            extra += ("\n\n\\* Taken while other work (test runs, a dry run) shared the two cores: an upper "
                      "bound, not comparable with the other times.")
        if any(r.get("resumed") for key, r in results.items.items() if key.startswith("model/")):
            extra += ("\n\n† Resumed after an interruption: the solver time of the blocks finished before it "
                      "plus the wall time of the rest.")
        gaps, svdllm_x = [], []
        for ratio in RATIOS:
            if f"model/svdllm/{ratio}" in results:
                x = results.items[f"model/svdllm/{ratio}"]["ppl"] / dense["ppl"]
                svdllm_x.append(f"at {ratio} SVD-LLM is at {x:.2f}x the dense perplexity, half of it at {x / 2:.2f}x")
        for name in COSPADI:
            for ratio in RATIOS:
                r, svdllm = (results.items.get(f"model/{m}/{ratio}") for m in (name, "svdllm"))
                if r and svdllm:
                    gaps.append(f"{name} @ {ratio}: {(r['ppl'] - dense['ppl']) / (svdllm['ppl'] - dense['ppl']):.2f}")
        if gaps:
            extra += ("\n\nThe paper reports CoSpaDi at roughly half SVD-LLM's perplexity on its 1B LLaMA at 0.2, "
                      "which puts SVD-LLM there at twice the dense perplexity or more. Here " + "; ".join(svdllm_x)
                      + ". The dense perplexity is a floor both methods share, so where SVD-LLM stays near it the "
                      "ratio of perplexities cannot approach 0.5. The comparable figure is the degradation each "
                      "adds over dense, (ppl - dense) / (SVD-LLM - dense): " + "; ".join(gaps) + ".")
            per_matrix = []
            for name in SOLVER_MATRICES:
                ours, svd = results.items.get(f"curve/{name}/doubling/60"), results.items.get(f"svdllm-error/{name}")
                if ours and svd:
                    per_matrix.append(f"{name} {ours['error'] / svd['error']:.2f}x")
            if per_matrix:
                extra += (" Per matrix (table above), CoSpaDi's output error at the default T=60 against "
                          "SVD-LLM's: " + ", ".join(per_matrix) + ": the gain is uneven across projection types.")
        lowrank = RESULTS / f"lowrank{suffix}.json"  # bench_lowrank, same model, calibration and held-out text
        lowrank = json.loads(lowrank.read_text()).get("items", {}) if lowrank.exists() else {}
        global_ranks = [(label, lowrank[key]["ppl"]) for label, key in
                        (("SVD-LLM", "svdllm+global@0.2"), ("`fwsvd --whiten`", "fwsvd-white+global@0.2"))
                        if key in lowrank]
        if global_ranks:
            extra += ("\n\nEvery row gives each matrix the same ratio. The low-rank section (a separate run, same "
                      "calibration and held-out text) allocates ranks globally by Fisher sensitivity; at 0.2 that "
                      "takes " + " and ".join(f"{label} to {ppl:.2f}" for label, ppl in global_ranks)
                      + "; CoSpaDi's own global allocation (one byte budget, `--allocation global`) is "
                      "measured on general text in the zero-shot section.")
        r02 = results.items.get("model/cospadi/0.2")
        if r02:
            extra += (f"\n\nCoSpaDi at 0.2 removes {r02['ratio_targeted']:.1%} of the targeted parameters "
                      f"({r02['ratio_storage']:.1%} counting the support bit masks at float32), "
                      f"{r02['ratio_model']:.1%} of the model. Of its {r02['compress_s']:.0f} s, OMP took "
                      f"{r02['omp_s']:.0f} s and K-SVD {r02['ksvd_s']:.0f} s. Saved and reloaded, its logits differ "
                      f"by at most {r02['reload_max_abs_diff']:.1e}.")
        sections.append(f"### Whole model\n\nSmolLM2-135M, calibrated on 32 x 512 tokens of {calibrated}, "
                        f"perplexity on {held} (dense: {dense['ppl']:.2f}); uniform ratios, parameters "
                        "counted. `cospadi-g2` shares one dictionary per projection type between pairs of "
                        "consecutive layers.\n\n" + markdown_table(
                            ["method"] + [f"ppl @ {r}" for r in RATIOS] + [f"time @ {r}" for r in RATIOS],
                            model_rows) + extra)
    write_section(calib_name("cospadi", calib_text), f"## CoSpaDi (sparse dictionaries), {calib_text} calibration\n\n"
                  f"`python benchmarks/bench_cospadi.py --calib {calib_text}`, {results.measured()}, "
                  f"{results.machine(results.items.get('machine', {}).get('text'))}.\n\n" + "\n\n".join(sections))


def gpu_latency(device: str, fresh: bool) -> None:
    """DictionaryLinear latency on a GPU: results in cospadi-<device>.json, section cospadi-<device>."""
    name = f"cospadi-{device.split(':')[0]}"
    results = Results(name, {"device": torch.cuda.get_device_name(device), "dtype": "bfloat16"}, fresh=fresh)
    bench_latency(results, device, torch.bfloat16)
    write_section(name, f"### DictionaryLinear latency on {results.settings['device']}\n\n"
                  f"`python benchmarks/bench_cospadi.py --device {device}`, {results.measured()}, "
                  f"torch {torch.__version__}. "
                  "Microseconds per call (best of many, synchronised), batch 1, bfloat16, ratio 0.2 for both "
                  "factorizations. `auto` takes the gather kernel for one token and the code GEMM beyond.\n\n"
                  + latency_table(results))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_calib_argument(ap)
    ap.add_argument("--max-chunks", type=int, default=16)
    ap.add_argument("--only", default="solver,latency,model", help="comma-separated parts to run")
    ap.add_argument("--fresh", action="store_true", help="ignore results of an earlier, interrupted run")
    ap.add_argument("--device", default="cpu", help="a GPU (cuda) runs the latency part alone, in bfloat16")
    args = ap.parse_args()
    if args.device != "cpu":
        gpu_latency(args.device, args.fresh)
        return
    settings = {"model": "smollm2-135m", "calib_samples": 32, "calib_seq_len": 512, "seq_len": 2048,
                "max_chunks": args.max_chunks}
    job = fk.CompressJob(**settings, calib=args.calib, eval=args.calib, eval_before=False, seed=0)
    if args.calib != "shakespeare":  # the plays' stored results predate the option
        settings["calib"] = args.calib
    results = Results(calib_name("cospadi", args.calib), settings, fresh=args.fresh)
    parts = set(args.only.split(","))
    if parts - {"report"}:
        results.put("machine", {"text": machine()})  # as measured, not as reported
    # every whole-model point: calibrated on one corpus, perplexity on its held-out split (factorkit.run)
    try:  # the headline comparison first, then the solver study, then the rest
        if "latency" in parts:
            bench_latency(results)
        if parts & {"model", "solver"}:  # (--only report rewrites BENCHMARKS.md from the stored results)
            base, tok = fk.models.load(job.model)
        if "model" in parts:
            bench_model(results, base, tok, job, ratios=(0.2,), cospadi=("cospadi",))
        if "solver" in parts:
            calib = calibration_tokens(tok, job.calib, job.calib_samples, job.calib_seq_len, job.seed)
            bench_solver(results, block_matrices(base, calib))
        if "model" in parts:
            bench_model(results, base, tok, job)
    finally:
        report(results, args.calib)


if __name__ == "__main__":
    main()
