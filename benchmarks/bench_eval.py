"""Every compression method measured as the field measures it, on one model.

For dense and each method at ratios 0.2 / 0.3 / 0.4, calibrated on the built-in
general-English corpus: perplexity on its held-out passages, perplexity on the
held-out Shakespeare plays, and lm-evaluation-harness's zero-shot suite (8
tasks, a fixed number of documents per task). SVD-LLM calibrated on the plays
is the domain-specific second calibration. One run per model, side by side;
resumable (results/eval-<model>.json), then the `eval-<model>` section of
BENCHMARKS.md and a plot.

    python benchmarks/bench_eval.py --model smollm2-135m [--limit 100] [--methods svdllm,cospadi] [--report]
    python benchmarks/bench_eval.py --model gemma3-270m
    python benchmarks/bench_eval.py --model smollm2-135m --dense-full [--tasks piqa,arc_easy]

`--dense-full` scores the dense model on every document of the suite, one task
at a time (results/eval-<model>-full.json, resumable per task), for the
per-task table beside the published numbers.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import re
import shutil
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, Results, held_out, machine, run_point, write_section  # noqa: E402

import factorkit as fk  # noqa: E402
from factorkit import kernels  # noqa: E402
from factorkit.eval import TASKS, zero_shot  # noqa: E402
from factorkit.report import markdown_table  # noqa: E402

RATIOS = (0.2, 0.3, 0.4)
HEAL_STEPS = 40  # healing steps of the "+heal" points (batch 4 x calib_seq_len tokens each)
HEAL_SAMPLES = 4 * HEAL_STEPS  # calibration windows they heal on (heal_samples): every step sees new text
# Published 0-shot numbers of the same dense model, for the per-task table:
# (source, the weights used here, {task: (metric, %)}).
PUBLISHED = {
    "smollm2-135m": ("the 'Baseline' column of the model card of lldois/SmolLM2-135M-Reasoning-SLERP-Champion on the "
                     "Hugging Face Hub (SmolLM2-135M-Instruct, lm-eval, 0-shot, every document; BF16 weights, not the "
                     "Q4_1 GGUF used here)", "the 4-bit Q4_1 GGUF",
                     {"piqa": ("acc_norm", 66.92), "hellaswag": ("acc_norm", 42.99), "arc_easy": ("acc", 54.12),
                      "arc_challenge": ("acc_norm", 27.73)}),
    # The GGUF's metadata names "Gemma 3 270m" with no chat template: the pre-trained variant.
    "gemma3-270m": ("Google's Gemma 3 270M model card, pre-trained variant, 0-shot (the card names no metric; "
                    "compared with lm-eval's acc; its HellaSwag figure is 10-shot and left out), on the original "
                    "weights, not the Q4_K_M GGUF used here", "the 4-bit Q4_K_M GGUF",
                    {"piqa": ("acc", 67.7), "boolq": ("acc", 61.4), "arc_easy": ("acc", 57.7)}),
}


def methods(cospadi_iterations: int) -> dict:
    """name -> config factory(ratio); every point calibrated on the general corpus unless the name says plays."""
    return {
        "svd": lambda r: fk.SVDConfig(ratio=r),
        "asvd": lambda r: fk.ASVDConfig(ratio=r),
        "svdllm": lambda r: fk.SVDLLMConfig(ratio=r),
        "svdllm-global": lambda r: fk.SVDLLMConfig(ratio=r, allocation="global"),
        "fwsvd-white-global": lambda r: fk.FWSVDConfig(ratio=r, whiten=True, allocation="global"),
        "cospadi": lambda r: fk.CoSpaDiConfig(ratio=r, iterations=cospadi_iterations),
        "dsformer": lambda r: fk.DSFormerConfig(ratio=r),
        # trained on the calibration windows themselves, as measured first (see TRAIN_ON_CALIB)
        "dsformer (calib windows)": lambda r: fk.DSFormerConfig(ratio=r),
        "svdllm (plays calib)": lambda r: fk.SVDLLMConfig(ratio=r),
        # one budget of stored bytes over the model (methods.auto); the allocation's own ratio counts bytes
        "cospadi-global": lambda r: fk.CoSpaDiConfig(ratio=r, iterations=cospadi_iterations, allocation="global"),
        "dsformer-global": lambda r: fk.DSFormerConfig(ratio=r, allocation="global"),
        "auto": lambda r: fk.AutoConfig(ratio=r, iterations=cospadi_iterations),
        f"svdllm-global+heal{HEAL_STEPS}": lambda r: fk.SVDLLMConfig(ratio=r, allocation="global", heal=HEAL_STEPS),
        f"auto+heal{HEAL_STEPS}": lambda r: fk.AutoConfig(ratio=r, iterations=cospadi_iterations, heal=HEAL_STEPS),
        # options priced in the Gram's metric (X^T X), as the solves see them: auto's default before the unit metric
        "auto (gram metric)": lambda r: fk.AutoConfig(ratio=r, iterations=cospadi_iterations, price_metric="gram"),
        # ... and low-rank options down to rank 1 (max_removal=1), the default before the cap; measured so
        "auto (low rank uncapped)": lambda r: fk.AutoConfig(ratio=r, iterations=cospadi_iterations, max_removal=1.0,
                                                            price_metric="gram"),
        f"auto (low rank uncapped)+heal{HEAL_STEPS}": lambda r: fk.AutoConfig(
            ratio=r, iterations=cospadi_iterations, max_removal=1.0, price_metric="gram", heal=HEAL_STEPS),
        # dictionary options priced by the eigenbasis estimate alone, the default before the refined one (with
        # low rank uncapped and the Gram's metric, as then)
        "auto (eigenbasis estimate)": lambda r: fk.AutoConfig(ratio=r, iterations=cospadi_iterations,
                                                              estimate="eigenbasis", max_removal=1.0,
                                                              price_metric="gram"),
        f"auto (eigenbasis estimate)+heal{HEAL_STEPS}": lambda r: fk.AutoConfig(
            ratio=r, iterations=cospadi_iterations, estimate="eigenbasis", max_removal=1.0, price_metric="gram",
            heal=HEAL_STEPS),
        "cospadi-global (eigenbasis estimate)": lambda r: fk.CoSpaDiConfig(
            ratio=r, iterations=cospadi_iterations, allocation="global", estimate="eigenbasis"),
        # and dictionaries fitted from random weight rows, as auto did before the SVD start became its default
        "auto (eigenbasis estimate, signals start)": lambda r: fk.AutoConfig(
            ratio=r, iterations=cospadi_iterations, estimate="eigenbasis", start="signals", max_removal=1.0,
            price_metric="gram"),
        f"auto (eigenbasis estimate, signals start)+heal{HEAL_STEPS}": lambda r: fk.AutoConfig(
            ratio=r, iterations=cospadi_iterations, estimate="eigenbasis", start="signals", max_removal=1.0,
            price_metric="gram", heal=HEAL_STEPS),
    }


# Points whose dictionary fits ran on the compiled solver (factorkit.kernels, solver.cpp) before points recorded
# which solver they ran on (the "solver" field); every other point without the field ran the torch version.
COMPILED_BEFORE_RECORDED = {"smollm2-135m": ("cospadi@0.3", "cospadi@0.4"),
                            "gemma3-270m": ("auto@0.3",)}


def solver_of(model: str, key: str, item: dict) -> str:
    """"compiled" or "torch": the dictionary solver a point's fits ran on."""
    return item.get("solver") or ("compiled" if key in COMPILED_BEFORE_RECORDED.get(model, ()) else "torch")


# Methods measured at some ratios only (comparisons, not grid lines).
ONLY_AT = {"auto (eigenbasis estimate, signals start)": (0.2,),
           "auto (gram metric)": (0.2,),
           f"auto (low rank uncapped)+heal{HEAL_STEPS}": (0.2, 0.4),
           f"auto (eigenbasis estimate, signals start)+heal{HEAL_STEPS}": (0.2,),
           # the default before the refined estimate, where it was measured
           f"auto (eigenbasis estimate)+heal{HEAL_STEPS}": (0.2, 0.4),
           "cospadi-global (eigenbasis estimate)": (0.2,),
           "dsformer (calib windows)": (0.2,)}
# Points whose training (healing, DSFormer's) repeats the method's own calibration windows instead of drawing
# windows of their own (HEAL_SAMPLES for healing, DSFormer's steps x batch by default), as measured first.
TRAIN_ON_CALIB = (f"auto (eigenbasis estimate, signals start)+heal{HEAL_STEPS}", "dsformer (calib windows)")


# What a point keeps of its compression's fit report (the allocations' choice, bytes and times).
FIT_FIELDS = ("types", "choice", "budget_bytes", "dense_bytes", "bytes", "optimality_gap", "predicted_loss",
              "fisher_s", "profile_s", "knapsack_s", "solve_s")
# The options that fix how a point is compressed and measured; a results file is kept per value of them.
SETTINGS = ("model", "limit", "cospadi_iterations", "calib_samples", "calib_seq_len", "seq_len", "max_chunks")


def add_point_arguments(ap: argparse.ArgumentParser) -> None:
    """The options of SETTINGS, and --fresh / --report (bench_eval.py and bench_quant.py share them)."""
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--limit", type=int, default=50, help="documents per zero-shot task (first N of each)")
    ap.add_argument("--cospadi-iterations", type=int, default=8)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--max-chunks", type=int, default=8)
    ap.add_argument("--fresh", action="store_true", help="ignore results of an earlier, interrupted run")
    ap.add_argument("--report", action="store_true", help="only rewrite BENCHMARKS.md and the plot")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_point_arguments(ap)
    ap.add_argument("--methods", default=None, help="comma-separated subset of the methods (default: all)")
    ap.add_argument("--ratios", default=",".join(map(str, RATIOS)), help="comma-separated subset of the ratios")
    ap.add_argument("--dense-full", action="store_true",
                    help="score the dense model on every document, task by task (resumable), then report")
    ap.add_argument("--tasks", default=",".join(TASKS), help="with --dense-full: the tasks to score")
    args = ap.parse_args()
    settings = {k: getattr(args, k) for k in SETTINGS}
    results = Results(f"eval-{args.model}", settings, fresh=args.fresh)
    table = methods(args.cospadi_iterations)
    chosen = list(table) if args.methods is None else args.methods.split(",")
    unknown = [m for m in chosen if m not in table]
    if unknown:
        ap.error(f"unknown method {unknown[0]!r}; choose from {', '.join(table)}")
    ratios = tuple(float(r) for r in args.ratios.split(","))
    if not set(ratios) <= set(RATIOS):
        ap.error(f"--ratios must be among {', '.join(map(str, RATIOS))}")
    full = Results(f"eval-{args.model}-full", {"model": args.model})
    if args.dense_full:
        tasks = args.tasks.split(",")
        if not set(tasks) <= set(TASKS):
            ap.error(f"--tasks must be among {', '.join(TASKS)}")
        measure_full(full, args.model, tasks)
    elif not args.report:
        measure(results, settings, {m: table[m] for m in chosen}, ratios)
    report(results, settings, table, full)


def measure_full(full: Results, model_name: str, tasks: list[str]) -> None:
    """The dense model on every document of ``tasks``; each finished task is stored at once."""
    full.put("machine", {"text": machine(), "shared": shared_note()})
    base, tok = fk.models.load(model_name)
    for task in tasks:
        if task in full:
            continue
        out = zero_shot(base, tok, (task,), limit=None, progress=True).as_dict()
        full.put(task, {**out["tasks"][task], "seconds": out["seconds"], "lm_eval_version": out["lm_eval_version"]})
        print(task, f"acc {100 * out['tasks'][task]['acc']:.2f}", f"in {out['seconds']:.0f} s", flush=True)


def measure(results: Results, settings: dict, chosen: dict, ratios: tuple[float, ...]) -> None:
    results.put("machine", {"text": machine(), "shared": shared_note()})  # as measured, not as reported
    base, tok = fk.models.load(settings["model"])
    job = fk.CompressJob(model=settings["model"], calib="general", eval="general", eval_before=False, seed=0,
                         **{k: settings[k] for k in ("calib_samples", "calib_seq_len", "seq_len", "max_chunks")})

    def evaluate(model, extra: dict) -> dict:
        t = time.perf_counter()
        plays = held_out(model, tok, dataclasses.replace(job, eval="shakespeare")).perplexity
        suite = zero_shot(model, tok, TASKS, limit=settings["limit"], progress=False)
        return {**extra, "ppl_plays": plays.perplexity, "plays_tokens": plays.tokens, "zero_shot": suite.as_dict(),
                "eval_s": time.perf_counter() - t + extra.get("eval_s", 0.0)}

    if "dense" not in results:
        t = time.perf_counter()
        general = held_out(base, tok, job).perplexity
        results.put("dense", evaluate(base, {"ppl_general": general.perplexity, "general_tokens": general.tokens,
                                             "eval_s": time.perf_counter() - t}))
        print("dense", summary_line(results["dense"]), flush=True)
    # a "+heal" point after its method's point in the same run heals a copy of that model (what --heal does
    # after the method: tests/test_heal.py) instead of compressing again
    order = sorted(chosen, key=lambda n: "+heal" in n)
    for ratio in ratios:
        unhealed = None  # (name, model, stored item) of the last point measured
        for name in order:
            key = f"{name}@{ratio}"
            if key in results or ratio not in ONLY_AT.get(name, RATIOS):
                continue
            point = dataclasses.replace(job, calib="shakespeare") if "plays" in name else job
            folder = RESULTS / "resume" / re.sub(r"[^A-Za-z0-9.@+-]+", "_", f"{settings['model']}-{key}")
            config = resumable(chosen[name](ratio), folder)
            if unhealed is not None and "+heal" in name and name.split("+heal")[0] == unhealed[0] \
                    and name not in TRAIN_ON_CALIB:
                results.put(key, evaluate(*heal_point(base, tok, job, config, *unhealed[1:])))
                print(key, summary_line(results[key]), flush=True)
                shutil.rmtree(folder, ignore_errors=True)
                continue
            if name in TRAIN_ON_CALIB:  # with its method: train_samples needs a config that trains
                point = dataclasses.replace(point, method=config, train_samples=settings["calib_samples"])
            elif "+heal" in name:
                point = dataclasses.replace(point, method=config, train_samples=HEAL_SAMPLES)
            model, rep = run_point(base, tok, point, config)
            if "plays" in name:  # calibrated on the plays; general-text perplexity measured separately
                general = held_out(model, tok, job).perplexity
            else:
                general = rep.perplexity_after
            s, fit = rep.compression.summary, rep.compression.fit
            extra = {k: fit[k] for k in FIT_FIELDS if k in fit}
            if "heal" in fit:
                extra["heal"] = {k: fit["heal"][k] for k in ("losses", "seconds")}
            results.put(key, evaluate(model, {
                "ppl_general": general.perplexity, "compress_s": rep.compression.seconds,
                "solver": "torch" if kernels.dictionary() is None else "compiled",
                "ratio_targeted": s.ratio_targeted, "ratio_storage": s.ratio_targeted_storage,
                "ratio_model": s.ratio_model, "params": s.model_params_after, "eval_s": rep.eval_seconds[1], **extra}))
            print(key, summary_line(results[key]), f"compressed in {rep.compression.seconds:.0f} s", flush=True)
            unhealed = (name, model, results[key]) if f"{name}+heal{HEAL_STEPS}" in chosen else None
            shutil.rmtree(folder, ignore_errors=True)
            del model


def resumable(config, folder: Path):
    """``config`` keeping what an interrupted point resumes from in ``folder``: the finished blocks (and
    allocation) of the methods that keep them, DSFormer's and the healing's training state (none of it part
    of the results, which a point's settings key)."""
    fields = {f.name for f in dataclasses.fields(config)}
    if "checkpoint_dir" in fields:
        config = dataclasses.replace(config, checkpoint_dir=str(folder / "blocks"))
    # training state every 10 steps (the default 50 would keep none of a 40-step healing before its end)
    if "train" in fields:  # DSFormer's training
        config = dataclasses.replace(config, train=dataclasses.replace(
            config.train, checkpoint_dir=str(folder / "train"), checkpoint_every=10))
    if config.heal:
        config = dataclasses.replace(config, heal_train=dataclasses.replace(
            config.heal_train, checkpoint_dir=str(folder / "heal"), checkpoint_every=10))
    return config


def heal_point(base, tok, job: fk.CompressJob, config, model, item: dict):
    """(healed copy of ``model``, its fields) for ``evaluate``: ``model`` (``item``: its stored point) healed
    for ``config.heal`` steps from ``base`` on HEAL_SAMPLES windows of the calibration text."""
    from factorkit.data import calibration_tokens
    from factorkit.methods.heal import heal

    healed = copy.deepcopy(model)
    data = calibration_tokens(tok, job.calib, HEAL_SAMPLES, job.calib_seq_len, job.seed)
    out = heal(healed, copy.deepcopy(base), data, config, progress=False)
    t = time.perf_counter()
    general = held_out(healed, tok, job).perplexity
    keep = ("ratio_targeted", "ratio_storage", "ratio_model", "params") + FIT_FIELDS  # what healing leaves as it was
    return healed, {**{k: item[k] for k in keep if k in item}, "ppl_general": general.perplexity,
                    "compress_s": item["compress_s"] + out["seconds"], "eval_s": time.perf_counter() - t,
                    "heal": {k: out[k] for k in ("losses", "seconds")}}


def shared_note() -> str:
    load = os.getloadavg()[0]
    return (f"the load average was {load:.1f} when the run started: compression times are upper bounds"
            if load > 0.5 else "")


def summary_line(item: dict) -> str:
    return (f"general ppl {item['ppl_general']:.4g}, plays ppl {item['ppl_plays']:.4g}, "
            f"zero-shot {100 * item['zero_shot']['average']:.2f}")


def fmt_ppl(p: float) -> str:
    return f"{p:.2f}" if p < 1e4 else f"{p:.3g}"


def report(results: Results, settings: dict, table: dict, full: Results) -> None:
    if "dense" not in results:
        print("no results yet")
        return
    dense = results["dense"]
    model = settings["model"]
    ran = results.items.get("machine", {})
    where = results.machine(ran.get("text")) + (f"; {ran['shared']}" if ran.get("shared") else "")
    zs = dense["zero_shot"]
    dsf = fk.DSFormerConfig().train  # the default training run
    rows = [["dense", "-", "-", "-", fmt_ppl(dense["ppl_general"]), "1.00x", "-", fmt_ppl(dense["ppl_plays"]), "1.00x",
             f"{100 * zs['average']:.2f} ± {100 * zs['average_stderr']:.2f}", "-",
             f"{100 * zs['average_norm']:.2f}", "-"]]
    for ratio in RATIOS:
        ref = results.items.get(f"svdllm@{ratio}")
        for name in table:
            item = results.items.get(f"{name}@{ratio}")
            if item is None:
                continue
            z = item["zero_shot"]
            vs_ref = lambda k: f"{item[k] / ref[k]:.3g}x" if ref else "-"  # noqa: E731
            rows.append([name, ratio, f"{item.get('ratio_storage', item['ratio_targeted']):.1%}",
                         f"{item['ratio_model']:.1%}", fmt_ppl(item["ppl_general"]),
                         f"{item['ppl_general'] / dense['ppl_general']:.3g}x", vs_ref("ppl_general"),
                         fmt_ppl(item["ppl_plays"]), f"{item['ppl_plays'] / dense['ppl_plays']:.3g}x",
                         f"{100 * z['average']:.2f} ± {100 * z['average_stderr']:.2f}",
                         f"{100 * (z['average'] - zs['average']):+.2f}", f"{100 * z['average_norm']:.2f}",
                         f"{item['compress_s']:.0f}"])
    main_table = markdown_table(
        ["method", "ratio", "removed (stored bytes)", "removed (model)", "general ppl", "vs dense", "vs svdllm", "plays ppl", "vs dense",
         "zero-shot acc avg (%)", "vs dense (points)", "acc_norm avg (%)", "compress (s)"], rows)
    task_table = dense_tasks(zs, full, model)
    plot(results, settings, table)
    allocation = allocation_table(results, table)
    plot_bytes(results, settings, table)
    plot_layers(results, settings)
    missing = [f"{n}@{r}" for r in RATIOS for n in table if f"{n}@{r}" not in results and r in ONLY_AT.get(n, RATIOS)]
    fitted = [key for key, item in results.items.items() if key.startswith(("cospadi", "auto"))]
    compiled = [key for key in fitted if solver_of(model, key, results.items[key]) == "compiled"]
    solvers = ("" if not compiled else
               f"\nThe dictionary fits of {', '.join(f'`{k}`' for k in compiled)} ran on the compiled solver "
               "(`factorkit.kernels`, solver.cpp: 4-6x faster than the torch version with the same supports, "
               "the `solver` section); those of the other CoSpaDi and `auto` rows on the torch version, so their "
               "compress times are not comparable.\n")
    pending = ("" if not missing else
               "\nNot measured yet (the run is resumable: rerun the command): " + ", ".join(missing) + ".\n")
    write_section(f"eval-{model}", f"""
## {model}: general text, the plays and the zero-shot suite

`python benchmarks/bench_eval.py --model {model}`, {results.measured()}, {where}.

Calibration: {settings['calib_samples']} random windows of {settings['calib_seq_len']} tokens from the calibration
split of the built-in `general` corpus (seed 0); `svdllm (plays calib)` is calibrated on the calibration plays instead.
Perplexity: {dense['general_tokens']} tokens of the corpus's held-out split and {dense['plays_tokens']} tokens of the
held-out plays, chunks of {settings['seq_len']}, float32. Zero-shot: lm-evaluation-harness {zs['lm_eval_version']},
0-shot, the first {settings['limit']} documents of each of the 8 tasks; "acc avg" is the mean of acc over the
tasks (as SVD-LLM and ROCKET report it), its stderr the tasks' combined (sqrt of the sum of squares / 8);
"acc_norm avg" takes acc_norm where lm-eval reports it (piqa, hellaswag, arc, openbookqa), acc elsewhere.
Two rows' averages differ beyond noise (95%) only by more than about 2.8 stderrs, {280 * zs['average_stderr']:.1f} points
here; the perplexities separate the methods far more finely at this limit.
`+heal{HEAL_STEPS}`: {HEAL_STEPS} healing steps of 4 x {settings['calib_seq_len']} tokens on {HEAL_SAMPLES} windows of the
same calibration split (`train_samples`; {', '.join(f'`{n}`' for n in TRAIN_ON_CALIB if '+heal' in n)} on the {settings['calib_samples']}
calibration windows, {HEAL_SAMPLES / settings['calib_samples']:g} passes over them). A `+heal{HEAL_STEPS}` row measured in
the same run as its method's row heals a copy of that row's model (the weights `--heal` gives); its compress
time is that row's plus the healing.
CoSpaDi runs {settings['cospadi_iterations']} alternations (the paper: 60) to fit this CPU; DSFormer its default
training, {dsf.steps} steps of {dsf.batch_size} x {settings['calib_seq_len']} tokens on {fk.DSFormerConfig().training_sequences()} windows of the calibration
split (`train_samples`' default; `dsformer (calib windows)` on the {settings['calib_samples']} calibration windows,
{fk.DSFormerConfig().training_sequences() / settings['calib_samples']:g} passes over them, as measured first). Ratio = fraction of the targeted matrices' parameters removed (`auto`, `cospadi-global`: of their
stored bytes, supports included); "removed (stored bytes)" counts what the targeted matrices store, support
masks included, "removed (model)" the whole model's parameters.
`auto` prices its options per calibration token at unit length and offers low rank down to 0.3 of a matrix's
bytes (`--price-metric unit --max-removal 0.7`, the defaults); `auto (gram metric)` prices them in X^T X
(`--price-metric gram`), `auto (low rank uncapped)` and the eigenbasis rows in X^T X with every rank on the menu
(`--max-removal 1`), the defaults when they were measured.
{solvers}{pending}
{main_table}

{allocation}
Dense, per task:

{task_table}

![zero-shot and perplexity against ratio](benchmarks/results/eval-{model}.png)
""")
    print(main_table)


def allocation_table(results: Results, table: dict) -> str:
    """For the points with one budget over the model: what each factor type got, the knapsack's certificate,
    where the time went, and the healing loss."""
    rows = []
    for ratio in RATIOS:
        for name in table:
            item = results.items.get(f"{name}@{ratio}")
            if item is None or ("types" not in item and "heal" not in item):
                continue
            types = item.get("types", {})
            kinds = ", ".join(f"{v['matrices']} {k} ({v['bytes'] / 2**20:.1f} MiB)" for k, v in sorted(types.items()))
            split = (" / ".join(f"{item[k]:.0f}" for k in ("fisher_s", "profile_s", "knapsack_s", "solve_s"))
                     if "profile_s" in item else "-")
            heal = item.get("heal")
            rows.append([f"{name}@{ratio}", kinds or "-",
                         (f"{item['optimality_gap']:.2g} of {item['predicted_loss']:.3g}"
                          if "optimality_gap" in item else "-"),
                         split, (f"{heal['losses'][0]:.3f} -> {heal['losses'][-1]:.3f} in {heal['seconds']:.0f} s"
                                 if heal and heal["losses"] else "-")])
    if not rows:
        return ""
    return ("\nOne budget over the model (`auto`, `cospadi-global`) and healing: matrices and bytes per factor type, "
            "the knapsack's certified distance to its optimum (predicted loss), seconds spent in the Fisher pass / "
            "profile / knapsack / solve, and the healing objective (next-token loss + KL to dense) at its first "
            "and last step:\n\n"
            + markdown_table(["point", "factor types", "optimality gap", "fisher / profile / knapsack / solve (s)",
                              "healing loss"], rows) + "\n")


def plot_bytes(results: Results, settings: dict, table: dict) -> None:
    """Zero-shot average and general-text perplexity against the bytes the targeted matrices store."""
    dense = results["dense"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, name in enumerate(table):
        pts = [results[f"{name}@{r}"] for r in RATIOS if f"{name}@{r}" in results]
        if not pts:
            continue
        xs = [1 - p.get("ratio_storage", p["ratio_targeted"]) for p in pts]
        ax1.plot(xs, [100 * p["zero_shot"]["average"] for p in pts], marker="o", color=f"C{i % 10}", label=name)
        ax2.plot(xs, [p["ppl_general"] for p in pts], marker="o", color=f"C{i % 10}", label=name)
    ax1.plot([1.0], [100 * dense["zero_shot"]["average"]], marker="*", ms=12, color="black", ls="", label="dense")
    ax2.plot([1.0], [dense["ppl_general"]], marker="*", ms=12, color="black", ls="", label="dense")
    for ax in (ax1, ax2):
        ax.set(xlabel="bytes stored by the targeted matrices (fraction of dense)")
    ax1.set(ylabel="zero-shot average (%)", title=f"{settings['model']}: zero-shot average against bytes")
    ax2.set(ylabel="perplexity, held-out general text (log)", yscale="log", title="general-text perplexity")
    ax1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / f"eval-{settings['model']}-bytes.png", dpi=120)
    plt.close(fig)


def plot_layers(results: Results, settings: dict) -> None:
    """Per matrix of the `auto` model at the smallest ratio measured: its factor type and the fraction of its
    dense bytes it keeps."""
    key = next((f"auto@{r}" for r in RATIOS if "choice" in results.items.get(f"auto@{r}", {})), None)
    if key is None:
        return
    choice = results[key]["choice"]
    layers = sorted({int(n.split(".")[-3]) for n in choice})
    kinds = list(dict.fromkeys(".".join(n.split(".")[-2:]) for n in choice))
    kept = torch.full((len(kinds), len(layers)), float("nan"))
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(layers) + 2), 3.6))
    for name, c in choice.items():
        i, j = kinds.index(".".join(name.split(".")[-2:])), layers.index(int(name.split(".")[-3]))
        kept[i, j] = c["bytes"] / c["dense_bytes"]
        ax.text(j, i, {"dense": "D", "lowrank": "L", "dictionary": "S"}[c["type"]], ha="center", va="center",
                fontsize=7)
    im = ax.imshow(kept.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set(yticks=range(len(kinds)), yticklabels=kinds, xticks=range(len(layers)), xticklabels=layers,
           xlabel="layer", title=f"{settings['model']} {key}: D dense, L low rank, S sparse dictionary")
    ax.tick_params(axis="x", labelsize=6)
    fig.colorbar(im, ax=ax, label="bytes kept (fraction of dense)")
    fig.tight_layout()
    fig.savefig(RESULTS / f"eval-{settings['model']}-layers.png", dpi=120)
    plt.close(fig)


def pct(task: dict, metric: str) -> str:
    return (f"{100 * task[metric]:.2f} ± {100 * task[f'{metric}_stderr']:.2f}"
            if task.get(metric) is not None else "-")


def dense_tasks(zs: dict, full: Results, model: str) -> str:
    """The dense model per task: the first documents (as every row above) and, where measured, every document,
    beside the published numbers."""
    source, weights, published = PUBLISHED.get(model, ("", "", {}))
    every = {t: full[t] for t in zs["tasks"] if t in full}
    rows = []
    for t, task in zs["tasks"].items():
        row = [t, f"{task['n']} of {task['docs']}", pct(task, "acc"), pct(task, "acc_norm")]
        if every:
            row += [pct(every[t], "acc"), pct(every[t], "acc_norm")] if t in every else ["-", "-"]
        rows.append(row + [f"{published[t][0]} {published[t][1]:.2f}" if t in published else "-"])
    head = ["task", "documents", "acc (%)", "acc_norm (%)"]
    if every:
        head += ["every document: acc (%)", "acc_norm (%)"]
    text = markdown_table(head + ["published (%)"], rows)
    if every:
        ran = full.items.get("machine", {})
        text += (f"\n\nEvery document: `python benchmarks/bench_eval.py --model {model} --dense-full`, "
                 f"{full.measured()}, {full.machine(ran.get('text'))}; {len(every)} of {len(zs['tasks'])} tasks "
                 f"measured ({sum(v['seconds'] for v in every.values()) / 3600:.1f} h)"
                 + (f", mean acc {100 * sum(v['acc'] for v in every.values()) / len(every):.2f}"
                    if len(every) == len(zs["tasks"]) else "") + ".")
    if published:
        best = {t: every.get(t, zs["tasks"][t]) for t in published}
        far = max(within(best[t], *published[t]) for t in published)
        text += (f"\n\nPublished: {source}. Each published figure lies within {far:.1f} standard errors of ours "
                 "(every document where measured, else the first documents).")
        if far > 2:
            text += (" Beyond two standard errors, the likely cause is the weights, not the scoring: the model "
                     f"here is {weights} that ships offline, dequantized, where the published run used the "
                     "original weights (which cannot be fetched here to check).")
    if len(every) < len(zs["tasks"]):
        left = [t for t in zs["tasks"] if t not in every]
        text += (f"\n\nNot yet scored on every document here: {', '.join(left)} (hellaswag alone is 10,042 "
                 "documents of 4 endings). `--dense-full` scores them task by task and resumes where it stopped.")
    return text


def within(task: dict, metric: str, value: float) -> float:
    """How many of our standard errors the published ``value`` (%) lies from our ``metric``."""
    return abs(100 * task[metric] - value) / max(100 * task[f"{metric}_stderr"], 1e-9)


def plot(results: Results, settings: dict, table: dict) -> None:
    dense = results["dense"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, name in enumerate(table):
        pts = [(r, results[f"{name}@{r}"]) for r in RATIOS if f"{name}@{r}" in results]
        if not pts:
            continue
        xs = [r for r, _ in pts]
        ax1.plot(xs, [100 * p["zero_shot"]["average"] for _, p in pts], marker="o", color=f"C{i}", label=name)
        ax2.plot(xs, [p["ppl_general"] for _, p in pts], marker="o", color=f"C{i}", label=name)
    ax1.axhline(100 * dense["zero_shot"]["average"], color="gray", ls=":", label="dense")
    ax2.axhline(dense["ppl_general"], color="gray", ls=":", label="dense")
    ax1.set(xlabel="ratio of targeted parameters removed", ylabel="zero-shot average (%)",
            title=f"{settings['model']}: zero-shot average (8 tasks)")
    ax2.set(xlabel="ratio of targeted parameters removed", ylabel="perplexity, held-out general text (log)",
            yscale="log", title="general-text perplexity")
    for ax in (ax1, ax2):
        ax.set(xticks=RATIOS, xlim=(RATIOS[0] - 0.05, RATIOS[-1] + 0.05))
    ax1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / f"eval-{settings['model']}.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
