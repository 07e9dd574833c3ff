"""What `auto`'s picks really cost, against what its knapsack was told they cost.

`auto` prices every option of every matrix by sensitivity x whitened squared
error (a second-order estimate around the dense weight, scaled per matrix by
the Fisher deletion loss) and lets a knapsack pick. Here each pick of a point
that `bench_eval.py` measured is put alone into the dense model (factorized
from the dense model's calibration Gram, as the profile sees the matrix) and
its real cost is measured: the increase of the mean next-token loss on the
calibration windows. Probed: every low-rank pick of the point, beside what a
second point chose for the same matrix and a rank storing as many bytes as
that choice; and a seeded sample of the point's dictionary picks.

    python benchmarks/bench_pricing.py --model smollm2-135m \\
        [--point "auto (low rank uncapped)@0.2"] [--compare cospadi-global@0.2] [--sample 6]

A knapsack over priced options picks the ones whose price is too low; this
shows how far too low, option by option.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, Results, machine, write_section  # noqa: E402

import factorkit as fk  # noqa: E402
from factorkit.data import calibration_tokens  # noqa: E402
from factorkit.report import markdown_table  # noqa: E402
from factorkit.solvers import whitened_svd  # noqa: E402
from factorkit.solvers.dictionary import sparse_dictionary  # noqa: E402
from factorkit.solvers.whitening import cholesky_factor  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--point", default="auto (low rank uncapped)@0.2", help="a bench_eval point with a choice")
    ap.add_argument("--compare", default="cospadi-global@0.2", help="a second point, for the same matrices")
    ap.add_argument("--sample", type=int, default=6, help="dictionary picks of the point probed too (seeded)")
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args()
    stored = json.loads((RESULTS / f"eval-{args.model}.json").read_text())
    for key in (args.point, args.compare):
        if "choice" not in stored["items"].get(key, {}):
            ap.error(f"{key!r} has no stored choice in eval-{args.model}.json; run bench_eval.py for it first")
    evaluated = stored["settings"]
    settings = {"model": args.model, "point": args.point, "compare": args.compare, "sample": args.sample,
                "calib_samples": evaluated["calib_samples"], "calib_seq_len": evaluated["calib_seq_len"],
                "iterations": evaluated["cospadi_iterations"]}
    results = Results(f"pricing-{args.model}", settings)
    if not args.report:
        measure(results, settings, stored["items"][args.point]["choice"], stored["items"][args.compare]["choice"])
    report(results, settings)


def probes(point: dict, compare: dict, sample: int) -> list[tuple[str, str, dict]]:
    """(matrix, label, option) to measure: each low-rank pick of the point, the compare point's option for that
    matrix and a rank of its bytes; then ``sample`` of the point's dictionary picks (seeded) and theirs."""
    out = []
    low = [n for n, c in point.items() if c["type"] == "lowrank"]
    picks = [n for n, c in point.items() if c["type"] == "dictionary"]
    for name in low + random.Random(0).sample(picks, min(sample, len(picks))):
        mine, theirs = point[name], compare[name]
        out.append((name, "point", mine))
        if theirs["type"] != "dense" and (theirs["type"], theirs["size"]) != (mine["type"], mine["size"]):
            out.append((name, "compare", theirs))
        if mine["type"] == "lowrank" and theirs["type"] == "dictionary":
            out.append((name, "rank of the compare's bytes", {"type": "lowrank", "bytes": theirs["bytes"],
                                                               "dense_bytes": theirs["dense_bytes"]}))
    return out


def measure(results: Results, settings: dict, point: dict, compare: dict) -> None:
    results.put("machine", {"text": machine()})
    base, tok = fk.models.load(settings["model"])
    base.eval()
    data = calibration_tokens(tok, "general", settings["calib_samples"], settings["calib_seq_len"], 0)
    todo = probes(point, compare, settings["sample"])
    modules = {name: base.get_submodule(name) for name, _, _ in todo}
    grams: dict[str, torch.Tensor] = {}
    units: dict[str, torch.Tensor] = {}  # every token once, at unit length: the metric auto prices in

    def hook(name: str):
        def record(module, inputs, output) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            unit = x / x.norm(dim=1, keepdim=True).clamp_min(1e-300)
            grams[name] = grams[name] + x.T @ x if name in grams else x.T @ x
            units[name] = units[name] + unit.T @ unit if name in units else unit.T @ unit
        return record

    @torch.no_grad()
    def loss() -> float:
        return sum(float(base(b, labels=b).loss) * b.shape[0] for b in data.split(8)) / data.shape[0]

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    dense = loss()
    for h in handles:
        h.remove()
    results.put("dense", {"loss": dense})
    for name, label, option in todo:
        key = f"{name}|{label}"
        if key in results and "top_share" in results[key]:
            continue
        weight = modules[name].weight.data
        w, gram = weight.double(), grams[name]
        m, n = w.shape
        spectrum = torch.linalg.svdvals(w @ cholesky_factor(gram).factor).square()
        t = time.perf_counter()
        if option["type"] == "lowrank":
            rank = option["size"][0] if "size" in option else option["bytes"] // (weight.element_size() * (m + n))
            factors = whitened_svd(weight, gram, rank)
            approx, size = factors.U @ factors.V, [rank]
            error = float(spectrum[rank:].sum())
        else:
            fit = sparse_dictionary([weight], *option["size"], gram=gram, iterations=settings["iterations"],
                                    seed=0, start="svd")[0]
            approx, size = fit.dense(), option["size"]
            error = fit.errors[-1] ** 2 * float(spectrum.sum())
        solve_s = time.perf_counter() - t
        # the point's own low-rank price fixes the matrix's sensitivity (its price is sensitivity x the
        # discarded energy, exactly); the rank of the compare's bytes is priced with it
        mine = point[name]
        if "predicted_loss" in option:
            predicted = option["predicted_loss"]
        else:
            predicted = mine["predicted_loss"] / float(spectrum[mine["size"][0]:].sum()) * error
        unit_error = float(torch.trace((w - approx.double()) @ units[name] @ (w - approx.double()).T)
                           / torch.trace(w @ units[name] @ w.T))
        if key in results:  # measured before this column was added: the loss stands, the solve is the same
            measured = results[key]["measured"]
        else:
            keep = weight.clone()
            weight.copy_(approx.to(weight.dtype))
            measured = loss() - dense
            weight.copy_(keep)
        top = float(torch.linalg.eigvalsh(gram)[-1] / gram.trace())  # X^T X's largest direction, its share
        row = {"matrix": name, "label": label, "type": option["type"], "size": size, "unit_error": unit_error,
               "top_share": top,
               "kept": option["bytes"] / option["dense_bytes"] if "size" in option else
               size[0] * (m + n) / (m * n), "predicted": predicted, "measured": measured,
               "relative_error": error / float(spectrum.sum()), "solve_s": solve_s}
        results.put(key, row)
        print(key, f"predicted {predicted:.3g}, measured {measured:+.4f}", flush=True)


def report(results: Results, settings: dict) -> None:
    rows = [v for k, v in results.items.items() if "|" in k]
    if not rows:
        print("no results yet")
        return
    ran = results.machine(results.items.get("machine", {}).get("text"))
    label = {"point": settings["point"], "compare": settings["compare"],
             "rank of the compare's bytes": "rank of the compare's bytes"}
    table = markdown_table(
        ["matrix", "X^T X's top direction (share)", "whose option", "option", "bytes kept", "whitened error (share)",
         "unit-metric error (share)", "predicted loss", "measured loss (nats)", "measured / predicted"],
        [[r["matrix"].removeprefix("model."), f"{r['top_share']:.3f}" if "top_share" in r else "-", label[r["label"]],
          f"{r['type']} {'x'.join(map(str, r['size']))}", f"{r['kept']:.3f}", f"{r['relative_error']:.4f}",
          f"{r['unit_error']:.4f}" if "unit_error" in r else "-",
          f"{r['predicted']:.3g}", f"{r['measured']:+.4f}", f"{r['measured'] / r['predicted']:.0f}"] for r in rows])
    low = [r for r in rows if r["label"] == "point" and r["type"] == "lowrank"]
    lines = []
    if low:
        worst = max(low, key=lambda r: r["measured"])
        others = sum(r["measured"] for r in low if r is not worst)
        lines.append(f"- The point's {len(low)} low-rank picks cost {sum(r['measured'] for r in low):.4f} nats "
                     f"alone each, summed; the worst, {worst['matrix'].removeprefix('model.')} at rank "
                     f"{worst['size'][0]} ({worst['kept']:.3f} of its bytes), {worst['measured']:.4f} "
                     f"({worst['measured'] / max(others, 1e-12):.1f}x the other {len(low) - 1} together)"
                     + (f"; X^T X's top direction holds {worst['top_share']:.3f} of its trace there, and the "
                        f"pick drops {worst['relative_error']:.4f} of the whitened energy but "
                        f"{worst['unit_error']:.4f} in the unit metric" if "top_share" in worst else "") + ".")
    ratios = sorted(r["measured"] / r["predicted"] for r in rows if r["measured"] > 0)
    if ratios:
        lines.append(f"- Measured per predicted over the options that raised the loss: {ratios[0]:.0f} to "
                     f"{ratios[-1]:.0f} (median {ratios[len(ratios) // 2]:.0f}); the predicted loss is in "
                     "the Fisher's units, so only its spread across options matters to the knapsack.")
    write_section(f"pricing-{settings['model']}", f"""
## {settings['model']}: what `auto`'s picks cost, against their price

`python benchmarks/bench_pricing.py --model {settings['model']} --point "{settings['point']}" --compare \
"{settings['compare']}"`, {results.measured()}, {ran}.

Each option alone in the dense model, factorized from the dense model's Gram of
{settings['calib_samples']} x {settings['calib_seq_len']} calibration tokens (`general`, seed 0; dictionaries
{settings['iterations']} alternations from the SVD start); measured: the increase of the mean next-token loss on
those windows (dense: {results['dense']['loss']:.4f} nats). Predicted: the price the knapsack saw
(`predicted_loss` of `bench_eval.py`'s stored choice; a rank of the compare's bytes priced as the point's rank
is). A measured loss below zero is an option that happens to fit these windows better than the dense weight:
the second-order price cannot see that either. Whitened error: the share of ||W L||^2 (L L^T = X^T X) the
option drops, what the price was computed from; unit-metric error: the share of sum_t ||W x_t||^2 / ||x_t||^2
it drops (every calibration token once, at unit length; `auto`'s `--price-metric unit`), measured on the
option itself.

{chr(10).join(lines)}

{table}
""")


if __name__ == "__main__":
    main()
