"""SLTrain against full-rank and low-rank pretraining, in one run.

1. Pretraining: the same LLaMA (llama-20m shape; BPE-4096 trained on the
   calibration plays of Shakespeare), the same tokens in the same order, for
   the same number of steps: full-rank, low-rank (rank 64) and SLTrain (rank
   64 + 3% sparse). The step count is what fits in about --minutes for the
   slowest of the three, timed first. Held-out perplexity (the evaluation
   plays), trainable parameters, AdamW state bytes, peak tensor memory of a
   training step, wall time; the three loss curves as sltrain_loss.png.
2. Memory at the paper's smallest shape (llama-60m): parameters, AdamW state
   and the peak tensor memory of one training step for each parameterization.

Resumable: each finished item goes to benchmarks/results/sltrain.json, and a
pretraining run interrupted halfway resumes from its checkpoint
(benchmarks/results/sltrain-ckpt/).

    python benchmarks/bench_sltrain.py [--minutes 30] [--only pretrain,memory,report] [--fresh]

`--only report` redraws the plot and rewrites BENCHMARKS.md from the stored results.
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, Results, machine, with_train, write_section  # noqa: E402

import factorkit as fk  # noqa: E402
from factorkit.data import pretrain_rows, train_heldout_text  # noqa: E402
from factorkit.models.tokenizer import load_tokenizer  # noqa: E402
from factorkit.report import markdown_table  # noqa: E402
from factorkit.training import model_loss  # noqa: E402
from factorkit.workflows.pretrain import PretrainConfig, build_model, count_parameters, step_memory  # noqa: E402

PARAMS = ("full", "lowrank", "sltrain")
# Learning rates as the papers tune them for their 60M model: 1e-3 for full and
# low rank (GaLore's baselines), 3e-3 for SLTrain (its scripts).
LR = {"full": 1e-3, "lowrank": 1e-3, "sltrain": 3e-3}
BASE = dict(model="llama-20m", rank=64, density=0.03, alpha=32.0, text="shakespeare", tokenizer="bpe-4096",
            seq_len=256, batch_size=16, eval_every=50, eval_rows=64, seed=0)


def config_for(param: str, steps: int, **extra) -> PretrainConfig:
    return with_train(PretrainConfig, {**BASE, "param": param, "lr": LR[param], "steps": steps, **extra})


def training_rows():
    """The tokenizer and the training rows every run uses (as ``pretrain`` makes them)."""
    train_text, heldout_text = train_heldout_text(BASE["text"], BASE["seed"])
    tokenizer = load_tokenizer(BASE["tokenizer"], train_text)
    return tokenizer, pretrain_rows(tokenizer, train_text, heldout_text, BASE["seq_len"])[0]


def step_seconds(param: str, rows: torch.Tensor, vocab: int, repeats: int = 4) -> float:
    """Median wall time of a training step (forward, backward, AdamW) of a fresh model."""
    config = config_for(param, 1)
    model = build_model(config, vocab).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.train.lr)
    times = []
    for i in range(repeats + 1):
        t = time.perf_counter()
        model_loss(model, rows[i * 16:(i + 1) * 16]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return sorted(times[1:])[len(times[1:]) // 2]


def bench_pretrain(results: Results, minutes: float) -> None:
    if "steps" not in results:
        tokenizer, rows = training_rows()
        timed = {p: step_seconds(p, rows, len(tokenizer)) for p in PARAMS}
        steps = int(minutes * 60 / max(timed.values()))
        results.put("steps", {"steps": steps, "step_seconds": timed, "train_rows": rows.shape[0]})
        print(f"{steps} steps each; step times {timed}")
    steps = results["steps"]["steps"]
    for param in PARAMS:
        key = f"pretrain/{param}"
        if key in results:
            continue
        ckpt = RESULTS / "sltrain-ckpt" / param
        config = config_for(param, steps, checkpoint_dir=str(ckpt), checkpoint_every=25)
        job = fk.PretrainJob(config=config, memory=True)
        results.put(key, fk.run(job).result.summary())
        shutil.rmtree(ckpt, ignore_errors=True)


def bench_memory(results: Results) -> None:
    """One training step at the paper's llama-60m shape, batch 4 x 256, for each parameterization."""
    tokenizer = None
    for param in PARAMS:
        key = f"memory60m/{param}"
        if key in results:
            continue
        if tokenizer is None:
            tokenizer, rows = training_rows()
        config = config_for(param, 1, model="llama-60m", rank=128, batch_size=4)
        model = build_model(config, len(tokenizer))
        results.put(key, {**count_parameters(model), **step_memory(model, rows, config)})


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def plot(results: Results) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for param, color in zip(PARAMS, ("C0", "C1", "C2")):
        item = results.items.get(f"pretrain/{param}")
        if not item:
            continue
        losses = torch.tensor(item["losses"])
        window = 10
        smooth = torch.nn.functional.avg_pool1d(losses[None, None], window, 1).flatten() if len(losses) > window else losses
        ax.plot(range(window, window + len(smooth)) if len(losses) > window else range(1, len(losses) + 1),
                smooth.tolist(), color=color, label=f"{param} (train, mean of {window} steps)")
        ax.plot([e["step"] for e in item["evals"]], [e["loss"] for e in item["evals"]], "o--", color=color,
                markersize=4, label=f"{param} (held out)")
    ax.set_xlabel("optimizer step (16 x 256 tokens)")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title("Pretraining llama-20m on Shakespeare: full rank, low rank, SLTrain")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    path = RESULTS / "sltrain_loss.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def verdict(results: Results) -> str:
    """The paper's claim against this run, in one paragraph computed from the stored results."""
    item = {p: results[f"pretrain/{p}"] for p in PARAMS}
    ppl = {p: item[p]["evals"][-1]["perplexity"] for p in PARAMS}
    gap_full = ppl["sltrain"] / ppl["full"] - 1
    gap_low = 1 - ppl["sltrain"] / ppl["lowrank"]
    state = item["sltrain"]["optimizer_state_bytes"] / item["full"]["optimizer_state_bytes"]
    peak = item["sltrain"]["peak_step_bytes"] / item["full"]["peak_step_bytes"]
    close = gap_full <= 0.05
    better = gap_low > 0.02
    held = "holds" if close and better else "holds in part" if close or better else "does not hold"
    text = (f"**The paper's claim** (SLTrain close to full rank and clearly better than low rank, at a fraction "
            f"of the memory) **{held} here.** SLTrain's held-out perplexity is {ppl['sltrain']:.2f}: "
            f"{abs(gap_full):.1%} {'above' if gap_full > 0 else 'below'} full rank ({ppl['full']:.2f}) and "
            f"{abs(gap_low):.1%} {'below' if gap_low > 0 else 'above'} low rank ({ppl['lowrank']:.2f}) after the "
            f"same tokens, with {state:.0%} of full rank's AdamW state and {peak:.0%} of its peak step memory.")
    if "memory60m/full" in results and "memory60m/sltrain" in results:
        peak60 = results["memory60m/sltrain"]["peak_step_bytes"] / results["memory60m/full"]["peak_step_bytes"]
        text += (f" The peak falls less than the state because at this small width the activations of "
                 f"{BASE['batch_size']} x {BASE['seq_len']} tokens dominate a step; at the 60M shape below SLTrain's "
                 f"peak is {peak60:.0%} of full rank's, and the saving grows with the width.")
    epochs = results["steps"]["steps"] * BASE["batch_size"] / results["steps"]["train_rows"]
    tail = {p: statistics.fmean(item[p]["losses"][-50:]) for p in PARAMS}
    text += (f" Each run passes over the training plays {epochs:.1f} times: the steps in the training curves are the "
             "starts of new passes, where the models meet rows they have already fitted, and the held-out curves "
             f"flatten. Over the last 50 steps the training loss is {tail['full']:.2f} for full rank, "
             f"{tail['lowrank']:.2f} for low rank and {tail['sltrain']:.2f} for SLTrain against held-out "
             f"{item['full']['evals'][-1]['loss']:.2f}, {item['lowrank']['evals'][-1]['loss']:.2f} and "
             f"{item['sltrain']['evals'][-1]['loss']:.2f}.")
    if tail["sltrain"] < tail["full"] and gap_full > 0:
        text += (" SLTrain fits the training text better than full rank yet generalises slightly worse, so its "
                 "held-out gap on a corpus this small is not a lack of capacity.")
    for p in PARAMS:
        best = min(item[p]["evals"], key=lambda e: e["perplexity"])
        if ppl[p] > 1.02 * best["perplexity"]:
            text += (f" {p} overfits: its held-out perplexity bottomed at {best['perplexity']:.2f} at step "
                     f"{best['step']} and ended at {ppl[p]:.2f}.")
    if not close:
        text += (" The gap to full rank is wider than the paper's (34.15 against 34.06 at 60M after 1.1B tokens); "
                 f"this run sees {item['full']['tokens'] / 1e6:.0f}M tokens of a single small corpus, "
                 "so it compares the three early in training.")
    return text


def section(results: Results, command: str) -> str:
    lines = ["## SLTrain (sparse + low-rank pretraining) against full-rank and low-rank pretraining", "",
             f"Measured {results.measured()} on {results.machine()} with `{command}` (part of `make bench`).", ""]
    if "steps" in results:
        info = results["steps"]
        lines += [f"### Pretraining from scratch: llama-20m (hidden 256, 6 layers), {info['steps']} steps each", "",
                  f"Same model shape, tokens and order for all three: BPE-4096 trained on the calibration plays "
                  f"({info['train_rows']} rows of 256 tokens), 16 x 256 tokens per step, AdamW, 10% warm-up then "
                  "cosine, clipping at 1.0, float32. Rank 64 (a quarter of hidden) for low rank and SLTrain; "
                  "SLTrain adds a 3% random support, alpha 32. Learning rate 1e-3 for full and low rank, 3e-3 for "
                  "SLTrain (the papers' settings for their 60M model). Held-out perplexity on the first 64 rows "
                  "of the evaluation plays. Peak memory: tensor storage during one training step (forward, "
                  "backward, AdamW update) with the optimizer state already allocated, from the PyTorch "
                  "profiler's memory timeline.", ""]
        rows = []
        full = results.items.get("pretrain/full")
        timed = info["step_seconds"]
        for param in PARAMS:
            item = results.items.get(f"pretrain/{param}")
            if not item:
                continue
            ppl = item["evals"][-1]["perplexity"] if item["evals"] else math.nan
            rel = f"{ppl / full['evals'][-1]['perplexity']:.2f}x" if full and full["evals"] else ""
            rows.append([param, f"{ppl:.2f}", rel, f"{item['params_blocks'] / 1e6:.2f} M",
                         f"{item['params_trainable'] / 1e6:.2f} M", mib(item["optimizer_state_bytes"]),
                         mib(item["peak_step_bytes"]), f"{timed[param] / timed['full']:.2f}x",
                         f"{item['seconds'] / 60:.1f} min", f"{item['tokens'] / item['seconds']:.0f}"])
        lines += [markdown_table(["weights", "held-out ppl", "vs full", "block params", "trainable params",
                                  "AdamW state", "peak step memory", "step time vs full", "wall time",
                                  "tokens/s"], rows), "",
                  "Step time vs full: the median of 4 training steps of each parameterization timed one after "
                  "another in one process before the runs, the side-by-side figure; wall time and tokens/s are "
                  "each whole run's, evaluation and checkpoints included.", "",
                  "![loss curves](benchmarks/results/sltrain_loss.png)", ""]
        if all(f"pretrain/{p}" in results for p in PARAMS):
            lines += [verdict(results), ""]
    rows = []
    for param in PARAMS:
        item = results.items.get(f"memory60m/{param}")
        if item:
            rows.append([param, f"{item['params_blocks'] / 1e6:.2f} M", f"{item['params_trainable'] / 1e6:.2f} M",
                         mib(item["optimizer_state_bytes"]), mib(item["peak_step_bytes"])])
    if rows:
        lines += ["### Memory at the paper's smallest shape (llama-60m: hidden 512, 8 layers; rank 128)", "",
                  "One training step of 4 x 256 tokens, float32, vocabulary 4096 (the paper's 32k vocabulary "
                  "adds the same 58 MiB of embeddings, and their AdamW state, to every row).", "",
                  markdown_table(["weights", "block params", "trainable params", "AdamW state", "peak step memory"],
                                 rows)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0, help="wall time budget per pretraining run")
    parser.add_argument("--only", default="pretrain,memory",
                        help="comma-separated parts to run; report only redraws the plot and rewrites BENCHMARKS.md")
    parser.add_argument("--fresh", action="store_true")
    args = parser.parse_args()
    results = Results("sltrain", {**BASE, "lr": LR, "minutes": args.minutes}, fresh=args.fresh)
    parts = set(args.only.split(","))
    if "memory" in parts:
        bench_memory(results)
    if "pretrain" in parts:
        bench_pretrain(results, args.minutes)
    if parts & {"pretrain", "report"}:
        plot(results)
    command = "python benchmarks/bench_sltrain.py" + (f" --minutes {args.minutes:g}" if args.minutes != 30 else "")
    write_section("sltrain", section(results, command))


if __name__ == "__main__":
    main()
