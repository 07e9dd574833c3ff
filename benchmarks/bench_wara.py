"""WaRA against PEFT's LoRA (and full fine-tuning as the ceiling) on SmolLM2-135M, in one run.

Every run fine-tunes the same model on the same rows of the Shakespeare
calibration plays (the same batches in the same order, the shared loop) and
measures perplexity on the held-out plays before and after. WaRA and LoRA
adapt every Linear in the blocks with the same r, alpha and learning rate, so
they train the same number of parameters; LoRA at rank r * (2 * levels - 1)
matches instead the rank that WaRA's update reaches in the weight domain,
with that many times more parameters, and WaRA with one level (separable,
so LoRA in a rotated basis) isolates what the multi-level pyramid adds.

Resumable: finished runs go to benchmarks/results/wara.json, and a run
stopped halfway resumes from its checkpoint (benchmarks/results/wara-ckpt/).

    python benchmarks/bench_wara.py [--steps 100] [--fresh] [--report]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, Results, machine, with_train, write_section  # noqa: E402

import factorkit as fk  # noqa: E402
from factorkit.report import markdown_table  # noqa: E402
from factorkit.workflows.finetune import FinetuneConfig  # noqa: E402

R, ALPHA, LEVELS, WAVELET = 8, 16.0, 2, "db2"
BASE = dict(model="smollm2-135m", text="shakespeare", seq_len=256, batch_size=4, eval_rows=32, seed=0)
RUNS = {
    "lora": dict(adapter="lora", r=R, lr=5e-4),
    "wara": dict(adapter="wara", r=R, lr=5e-4, wavelet=WAVELET, levels=LEVELS),
    "wara-1level": dict(adapter="wara", r=R, lr=5e-4, wavelet=WAVELET, levels=1),
    f"lora-r{R * (2 * LEVELS - 1)}": dict(adapter="lora", r=R * (2 * LEVELS - 1), lr=5e-4),
    "full": dict(adapter="full", lr=2e-5),
}


def run_all(results: Results, steps: int) -> None:
    for name, settings in RUNS.items():
        if name in results:
            continue
        ckpt = RESULTS / "wara-ckpt" / name
        alpha = ALPHA * settings.get("r", R) / R  # the same alpha / r scale at every rank
        config = with_train(FinetuneConfig, {**BASE, **settings, "alpha": alpha, "steps": steps,
                                             "checkpoint_dir": str(ckpt), "checkpoint_every": 25})
        result = fk.run(fk.FinetuneJob(config=config)).result  # loads BASE["model"] afresh
        results.put(name, {**result.summary(), "resumed": result.steps_run < steps})
        shutil.rmtree(ckpt, ignore_errors=True)


def section(results: Results, steps: int) -> str:
    command = f"python benchmarks/bench_wara.py --steps {steps}"
    lines = ["## WaRA (wavelet low-rank adapters) against PEFT LoRA and full fine-tuning", "",
             f"Measured {results.measured()} on {results.machine()} with `{command}` (part of `make bench`).", "",
             f"SmolLM2-135M fine-tuned for {steps} steps of 4 x 256 tokens from the calibration plays (AdamW, 10% "
             "warm-up then cosine, the same batches for every run); perplexity on 32 x 256 tokens of the held-out "
             f"plays. Adapters on every Linear in the blocks, alpha / r = {ALPHA / R:g}, learning rate 5e-4; full "
             f"fine-tuning at 2e-5. WaRA: {WAVELET}, {LEVELS} levels. Step time: mean wall time of a training step "
             "(forward, backward, update) in the same run.", ""]
    lora = results.items.get("lora")
    rows = []
    for name in RUNS:
        item = results.items.get(name)
        if not item:
            continue
        ratio = f"{item['step_seconds'] / lora['step_seconds']:.2f}" if lora else ""
        rows.append([name, f"{item['perplexity_before']:.2f}", f"{item['perplexity_after']:.2f}",
                     f"{item['trainable'] / 1e6:.3f} M", f"{item['step_seconds']:.2f} s", ratio])
    lines.append(markdown_table(["run", "held-out ppl before", "after", "trainable params", "step time",
                                 "step time / LoRA"], rows))
    lines += ["", verdict(results)]
    return "\n".join(lines).rstrip() + "\n"


def verdict(results: Results) -> str:
    """What the table says about the paper's claim and the step-time target, in sentences."""
    get = results.items.get
    lora, wara = get("lora"), get("wara")
    if not (lora and wara):
        return ""
    gain = lambda item: item["perplexity_before"] - item["perplexity_after"]  # noqa: E731
    ratio = wara["step_seconds"] / lora["step_seconds"]
    ppl = wara["perplexity_after"] / lora["perplexity_after"]
    text = (f"At the same rank and the same trainable parameters WaRA ends at {wara['perplexity_after']:.2f} "
            f"against LoRA's {lora['perplexity_after']:.2f} ({ppl:.3f}x; "
            f"{gain(wara) / gain(lora):.2f}x LoRA's drop in perplexity), one seed. A WaRA step takes {ratio:.2f}x "
            f"a LoRA step, {'within' if ratio <= 1.3 else 'above'} the 1.3x target.")
    one, wide = get("wara-1level"), get(f"lora-r{R * (2 * LEVELS - 1)}")
    if one:
        text += (f" WaRA with one level (LoRA in a rotated basis) ends at {one['perplexity_after']:.2f}, so the "
                 f"second level changes the result by {wara['perplexity_after'] - one['perplexity_after']:+.2f}.")
    if wide:
        text += (f" LoRA at rank {R * (2 * LEVELS - 1)}, the rank WaRA's update reaches in the weight domain, ends "
                 f"at {wide['perplexity_after']:.2f} with {wide['trainable'] / wara['trainable']:.0f}x the "
                 "parameters.")
    full = get("full")
    if full:
        best = min(item["perplexity_after"] for name, item in results.items.items() if name != "full")
        text += f" Full fine-tuning, meant as the ceiling, ends at {full['perplexity_after']:.2f}" + (
            "." if full["perplexity_after"] <= best else
            f", above the best adapter's {best:.2f}: at lr {RUNS['full']['lr']:g} and {len(full['losses'])} steps "
            "it is no ceiling here; it needs a learning-rate sweep of its own.")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--fresh", action="store_true", help="ignore results of an earlier, interrupted run")
    parser.add_argument("--report", action="store_true", help="only rewrite BENCHMARKS.md from stored results")
    args = parser.parse_args()
    results = Results("wara", {**BASE, "steps": args.steps, "runs": RUNS}, fresh=args.fresh)
    if not args.report:
        run_all(results, args.steps)
    write_section("wara", section(results, args.steps))


if __name__ == "__main__":
    main()
