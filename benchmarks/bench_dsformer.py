"""DSFormer on SmolLM2-135M against fine-tuned low rank, and its layer's latency.

1. Whole model, in one run at one stored-parameter budget (ratio 0.3, the
   parameter count; the support bits are reported beside it): dense, SVD-LLM,
   SVD-LLM fine-tuned with the same steps as DSFormer (its factors trained on
   the same loss), DSFormer with the Straight-Through Factorizer from the
   data-aware start, DSFormer with STF off (support frozen after the start),
   DSFormer from a random start, and DSFormer with 4 row blocks; held-out
   perplexity and training wall time. Training: next-token loss on windows of
   the calibration text, the same steps, batch and learning rate for all;
   ``--calib general`` (default) or ``--calib shakespeare`` (the plays).
2. Latency of the exported layer (a DictionaryLinear with a 2:4 support over
   k atoms) against nn.Linear and LowRankLinear at the same parameter count,
   SmolLM2 shapes, decode (1 token) and prefill (16 to 512 tokens), every
   kernel; on the CPU in float32, with ``--device cuda`` in bfloat16 with the
   2:4 semi-structured kernel (latency only).
3. An encoder with a task head: all-MiniLM-L6-v2 with a 3-way Shakespeare
   genre head, fine-tuned dense, then SVD-LLM, SVD-LLM fine-tuned and
   DSFormer with and without STF at ratio 0.5; test accuracy.

Resumable: results in benchmarks/results/dsformer[-cuda].json; writes the
`dsformer`, `dsformer-encoder` and `dsformer-latency[-cuda]` sections of BENCHMARKS.md (the
whole-model part calibrated on the general corpus: dsformer-general.json, section `dsformer-general`).

    python benchmarks/bench_dsformer.py [--calib general|shakespeare] [--only model,encoder,latency,report]
        [--steps 200] [--device cuda] [--fresh]

`--only report` rewrites the sections of the device from the stored results.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS as RESULTS_DIR  # noqa: E402
from common import (CALIB_TEXT, Results, add_calib_argument, calib_name, held_out, machine,  # noqa: E402
                    reload_max_abs_diff, run_point, write_section)

import factorkit as fk  # noqa: E402
from factorkit.eval.latency import time_kernels  # noqa: E402
from factorkit.data import calibration_tokens  # noqa: E402
from factorkit.factors import DenseSparseLinear, LowRankLinear  # noqa: E402
from factorkit.factors import factor_parameters  # noqa: E402
from factorkit.training import TrainConfig, model_loss, train  # noqa: E402
from factorkit.report import markdown_table  # noqa: E402
from factorkit.solvers import rank_for_ratio  # noqa: E402
from factorkit.solvers.sparsity import Pattern, dense_sparse_budget  # noqa: E402

RATIO = 0.3
SHAPES = {"q/o 576x576": (576, 576), "k/v 192x576": (192, 576), "gate/up 1536x576": (1536, 576),
          "down 576x1536": (576, 1536)}
TOKENS = (1, 16, 64, 512)


def latency_kernels(device: str) -> list[str]:
    return ["gather", "sparse", "codes"] + (["semi24"] if device != "cpu" else [])


def bench_latency(results: Results, device: str, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    kernels = latency_kernels(device)
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
            row = time_kernels(dense, lowrank, compact, kernels, x)
            row["params"] = {"dense": out_f * in_f, "lowrank": r * (out_f + in_f), "dsformer": compact.param_count()}
            results.put(key, row)
            print(key, {k_: (f"{v * 1e6:.0f}us" if isinstance(v, float) else v) for k_, v in row.items()}, flush=True)


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


TRAIN = {"samples": 1024, "seq_len": 128, "batch_size": 4, "lr": 1e-4}
VARIANTS = {  # name: DSFormerConfig options
    "dsformer": {},
    "dsformer-no-stf": {"stf": False},
    "dsformer-random-init": {"init": "random"},
    "dsformer-4-blocks": {"blocks": 4},
}


def bench_model(results: Results, steps: int, calib_text: str) -> None:
    base, tok = fk.models.load("smollm2-135m")
    # every point: trained on windows of the calibration text, perplexity on its held-out split (factorkit.run)
    job = fk.CompressJob(model="smollm2-135m", calib=calib_text, calib_samples=TRAIN["samples"],
                         calib_seq_len=TRAIN["seq_len"], seed=0, eval=calib_text, eval_before=False, seq_len=2048,
                         max_chunks=16)
    tc = TrainConfig(steps=steps, lr=TRAIN["lr"], batch_size=TRAIN["batch_size"], seed=0)

    def finish(key: str, row: dict, summary, ppl: float) -> None:
        row.update(ratio=summary.ratio_targeted, ratio_storage=summary.ratio_targeted_storage, ppl=ppl)
        results.put(key, row)
        print(key, {k: v for k, v in row.items() if k != "losses"}, flush=True)

    if "dense" not in results:
        results.put("dense", {"ppl": held_out(base, tok, job).perplexity.perplexity})
    if "svdllm" not in results or "svdllm+ft" not in results:
        model, report = run_point(base, tok, job, fk.SVDLLMConfig(ratio=RATIO))
        compress_s = report.compression.seconds
        if "svdllm" not in results:
            finish("svdllm", {"compress_s": compress_s, "train_s": 0.0}, report.compression.summary,
                   report.perplexity_after.perplexity)
        data = calibration_tokens(tok, job.calib, job.calib_samples, job.calib_seq_len, job.seed)
        fit = train(model, data, factor_parameters(model, (LowRankLinear,)), copy.deepcopy(tc), model_loss,
                    desc="svdllm fine-tune")
        tuned = held_out(model, tok, job)
        finish("svdllm+ft", {"compress_s": compress_s, "train_s": fit.seconds, "losses": fit.losses}, tuned.summary,
               tuned.perplexity.perplexity)
    for name, options in VARIANTS.items():
        if name in results:
            continue
        config = fk.DSFormerConfig(ratio=RATIO, pattern="2:4", train=copy.deepcopy(tc), **options)
        model, report = run_point(base, tok, job, config)
        fit = report.compression.fit
        row = {"compress_s": report.compression.seconds - fit["train_s"], "train_s": fit["train_s"],
               "losses": fit["losses"], "support_moved": fit["support_moved"]}
        if name == "dsformer":
            row["reload_max_abs_diff"] = reload_max_abs_diff(model, tok, job)
        finish(name, row, report.compression.summary, report.perplexity_after.perplexity)


def _windows(losses: list[float], width: int = 10) -> list[float]:
    """Means of the training loss over consecutive windows of ``width`` steps (single batches are noisy)."""
    return [sum(losses[i:i + width]) / len(losses[i:i + width]) for i in range(0, len(losses), width)]


def model_section(results: Results, steps: int, calib_text: str) -> str:
    calibrated, held = CALIB_TEXT[calib_text]
    dense = results.items.get("dense")
    rows, notes = [], []
    for name in ["svdllm", "svdllm+ft"] + list(VARIANTS):
        r = results.items.get(name)
        if r is None:
            rows.append([name, "not run", "", "", "", "", ""])
            continue
        means = _windows(r.get("losses") or [])
        rows.append([name, f"{r['ppl']:.2f}", f"{r['ppl'] / results['svdllm+ft']['ppl']:.2f}x"
                     if "svdllm+ft" in results else "", f"{r['ratio']:.1%} / {r['ratio_storage']:.1%}",
                     f"{means[0]:.2f} -> {means[-1]:.2f}" if means else "", f"{r['compress_s']:.0f} s",
                     f"{r['train_s']:.0f} s" + (f", {r['support_moved']:.2%} of the support moved"
                                                 if "support_moved" in r else "")])
        jump = next((i for i, m in enumerate(means) if m > means[0] + 1.0), None)
        if jump is not None and means[-1] > means[0]:  # a loss spike the run did not recover from
            notes.append(f"{name}'s training loss jumped from {means[jump - 1]:.2f} to {means[jump]:.2f} in steps "
                         f"{10 * jump}-{10 * jump + 9} and ended at {means[-1]:.2f}, above its start")
    text = (f"### DSFormer against fine-tuned low rank\n\nSmolLM2-135M, ratio {RATIO} of the targeted parameters "
            f"(numbers only / with the support bits), 2:4 pattern; all trained runs take {steps} AdamW steps of "
            f"{TRAIN['batch_size']} x {TRAIN['seq_len']} tokens from {calibrated} at lr {TRAIN['lr']} "
            f"(warm-up, cosine decay, gradients clipped at norm 1). Perplexity on {held}"
            + (f" (dense {dense['ppl']:.2f})" if dense else "") + "; training loss as the mean of the first and "
            "the last 10 steps.\n\n"
            + markdown_table(["model", "ppl", "vs svdllm+ft", "removed", "train loss", "start", "training"], rows))
    ours, lowrank = results.items.get("dsformer"), results.items.get("svdllm+ft")
    if ours and lowrank:
        holds = "holds" if ours["ppl"] < lowrank["ppl"] else "does not hold"
        text += (f"\n\nThe paper's claim, that STF beats fine-tuned low rank at the same budget, {holds} here: "
                 f"{ours['ppl']:.2f} against {lowrank['ppl']:.2f} ({ours['ppl'] / lowrank['ppl']:.2f}x), removing "
                 f"{ours['ratio_storage']:.1%} of the targeted storage against {lowrank['ratio_storage']:.1%}.")
    if notes:
        text += (" " + "; ".join(notes) + ". Every run shares the batches and the schedule, so a spike like "
                 "this is an instability of training at this learning rate (one seed), and the perplexity it "
                 "leaves measures that more than the method.")
    reload = results.items.get("dsformer", {}).get("reload_max_abs_diff")
    if reload is not None:
        text += f"\n\nThe DSFormer model saved and reloaded gives logits within {reload:.1e}."
    return text


ENCODER = {"ratio": 0.5, "seq_len": 128, "train_per_class": 512, "test_per_class": 200, "steps": 300,
           "batch_size": 16, "lr_dense": 5e-5, "lr": 5e-5, "distill": 0.5}


@torch.no_grad()
def accuracy(model, data: dict) -> float:
    model.eval()
    hits = 0
    for ids, labels in zip(data["input_ids"].split(64), data["labels"].split(64)):
        hits += int((model(input_ids=ids).logits.argmax(-1) == labels).sum())
    return hits / data["labels"].numel()


def bench_encoder(results: Results) -> None:
    """all-MiniLM-L6-v2 with a 3-way genre head: fine-tune dense, then compress the fine-tuned model."""
    from factorkit.data import genre_passages

    base, tok = fk.models.load("all-minilm-l6-v2", num_labels=3)
    train_set = genre_passages(tok, "train", ENCODER["seq_len"], ENCODER["train_per_class"], seed=0)
    test_set = genre_passages(tok, "test", ENCODER["seq_len"], ENCODER["test_per_class"], seed=0)
    tc = TrainConfig(steps=ENCODER["steps"], lr=ENCODER["lr"], batch_size=ENCODER["batch_size"], seed=0)
    dense_path = RESULTS_DIR / "minilm-genre-dense"
    if "encoder/dense" not in results or not dense_path.exists():
        t = time.perf_counter()
        fit = train(base, train_set, list(base.named_parameters()), TrainConfig(
            steps=ENCODER["steps"], lr=ENCODER["lr_dense"], batch_size=ENCODER["batch_size"], seed=0), desc="dense")
        base.save_pretrained(dense_path)
        results.put("encoder/dense", {"accuracy": accuracy(base, test_set), "train_s": time.perf_counter() - t,
                                      "losses": fit.losses})
    tuned = type(base).from_pretrained(dense_path).eval()

    def finish(key: str, model, row: dict) -> None:
        summary = fk.summarize(model)
        row.update(accuracy=accuracy(model, test_set), ratio=summary.ratio_targeted,
                   ratio_storage=summary.ratio_targeted_storage)
        results.put(key, row)
        print(key, {k: v for k, v in row.items() if k != "losses"}, flush=True)

    if "encoder/svdllm+ft" not in results:
        model = copy.deepcopy(tuned)
        fk.compress(model, fk.SVDLLMConfig(ratio=ENCODER["ratio"]), train_set["input_ids"][:256])
        finish("encoder/svdllm", model, {"train_s": 0.0})
        teacher = copy.deepcopy(tuned).eval()  # the same loss as DSFormer's: task + distillation

        def distilled(m, batch):
            return model_loss(m, batch, teacher, ENCODER["distill"], 2.0)

        fit = train(model, train_set, factor_parameters(model, (LowRankLinear,)), copy.deepcopy(tc), distilled,
                    desc="svdllm fine-tune")
        finish("encoder/svdllm+ft", model, {"train_s": fit.seconds, "losses": fit.losses})
    for name, options in {"dsformer": {}, "dsformer-no-stf": {"stf": False}}.items():
        key = f"encoder/{name}"
        if key in results:
            continue
        model = copy.deepcopy(tuned)
        config = fk.DSFormerConfig(ratio=ENCODER["ratio"], pattern="2:4",
                                   train=dataclasses.replace(tc, distill=ENCODER["distill"]), **options)
        fit = fk.compress(model, config, [train_set]).fit
        finish(key, model, {"train_s": fit["train_s"], "losses": fit["losses"], "support_moved": fit["support_moved"]})


def encoder_section(results: Results) -> str:
    rows = []
    dense = results.items.get("encoder/dense")
    for name in ("svdllm", "svdllm+ft", "dsformer", "dsformer-no-stf"):
        r = results.items.get(f"encoder/{name}")
        if r:
            rows.append([name, f"{r['accuracy']:.1%}", f"{r['ratio']:.1%} / {r['ratio_storage']:.1%}",
                         f"{r['train_s']:.0f} s" + (f", {r['support_moved']:.2%} of the support moved"
                                                     if "support_moved" in r else "")])
    return (f"### DSFormer on an encoder with a task head\n\nall-MiniLM-L6-v2 with a new 3-way head (comedy / "
            f"history / tragedy, passages of {ENCODER['seq_len']} tokens; train passages from the first 80% of "
            f"every play, test passages from the rest, {ENCODER['test_per_class']} per genre). The dense model is "
            f"fine-tuned first ({ENCODER['steps']} steps of {ENCODER['batch_size']}, lr {ENCODER['lr_dense']}"
            + (f", test accuracy {dense['accuracy']:.1%}" if dense else "") + f"); each compressed model starts "
            f"from it at ratio {ENCODER['ratio']} (2x, the paper's first point) and trains the same "
            f"{ENCODER['steps']} steps at lr {ENCODER['lr']} on the task loss plus distillation from the fine-tuned "
            f"model (weight {ENCODER['distill']}, temperature 2).\n\n" + markdown_table(["model", "test accuracy", "removed", "training"], rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    add_calib_argument(ap)
    ap.add_argument("--only", default="model,encoder,latency",
                    help="comma-separated parts to run; report only rewrites BENCHMARKS.md from stored results")
    ap.add_argument("--steps", type=int, default=200, help="training steps of every trained model")
    ap.add_argument("--fresh", action="store_true", help="ignore results of an earlier, interrupted run")
    args = ap.parse_args()
    gpu = args.device != "cpu"
    dtype = torch.bfloat16 if gpu else torch.float32
    where = torch.cuda.get_device_name(args.device) if gpu else machine()
    suffix = "-cuda" if gpu else ""
    settings = {"device": where, "dtype": str(dtype), "ratio": RATIO}
    if not gpu:
        settings.update(steps=args.steps, train=TRAIN, encoder=ENCODER)
    results = Results(f"dsformer{suffix}", settings, fresh=args.fresh)
    parts = set(args.only.split(","))
    # the whole-model part of a calibration other than the plays (whose results predate the option) has its own file
    model_results = (results if args.calib == "shakespeare" or gpu else
                     Results(calib_name("dsformer", args.calib), {**settings, "calib": args.calib}, fresh=args.fresh))
    if "model" in parts and not gpu:
        bench_model(model_results, args.steps, args.calib)
    if parts & {"model", "report"} and not gpu and "dense" in model_results:  # --only report: from stored results
        write_section(calib_name("dsformer", args.calib),
                      f"## DSFormer (dense x sparse, trained), {args.calib} calibration\n\n"
                      f"`python benchmarks/bench_dsformer.py --only model --calib {args.calib}`, "
                      f"{model_results.measured()}, {where}.\n\n" + model_section(model_results, args.steps, args.calib))
    if "encoder" in parts and not gpu:
        bench_encoder(results)
    if parts & {"encoder", "report"} and not gpu:
        write_section("dsformer-encoder", encoder_section(results))
    if "latency" in parts:
        bench_latency(results, args.device, dtype)
    if parts & {"latency", "report"}:
        write_section(f"dsformer-latency{suffix}", f"### DSFormer layer latency{' on ' + where if gpu else ''}\n\n"
                      f"`python benchmarks/bench_dsformer.py --only latency{' --device ' + args.device if gpu else ''}`"
                      f", {results.measured()}, {where if not gpu else 'torch ' + torch.__version__}. "
                      "Microseconds per call "
                      f"(best of many{', synchronised' if gpu else ''}), batch 1, {str(dtype).replace('torch.', '')}, "
                      f"ratio {RATIO}: the exported DenseSparseLinear (2:4 support over k atoms) against nn.Linear "
                      "and LowRankLinear at the same parameter count.\n\n"
                      + latency_section(results, latency_kernels(args.device)))


if __name__ == "__main__":
    main()
