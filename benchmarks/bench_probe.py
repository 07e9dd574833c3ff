"""How well the cheap probe fits that price `auto`'s dictionary options rank them against the full solve.

On one block of the model (its inputs from the dense model, as the profile
sees them), every targeted matrix is fitted as a sparse dictionary at each of
the per-matrix ratios the profile probes, once with the probe's few
alternations and once with the full solve's; the predicted loss of an option
is sensitivity x whitened squared error, so within one matrix the two rank
options as their errors do, and across matrices the sensitivity is common to
both. Reported: Spearman's rank correlation of probe and full error over all
(matrix, ratio) options and within each matrix, and how much the probe
overstates the error.

    python benchmarks/bench_probe.py --model smollm2-135m [--block 15] [--full-iterations 8]
    python benchmarks/bench_probe.py --model smollm2-135m --block 5 --solves full_svd,full_refined

The refined estimate (``--estimate refined``, the default) is measured beside the eigenbasis one; another block than the
middle one keeps its own results file and section (``probe-MODEL-blockN``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Results, machine, write_section  # noqa: E402

import factorkit as fk  # noqa: E402
from factorkit.calibration import calibrate_blockwise  # noqa: E402
from factorkit.data import calibration_tokens  # noqa: E402
from factorkit.methods.auto import PROBE_RATIOS, eigenbasis_errors, refined_errors  # noqa: E402
from factorkit.report import markdown_table  # noqa: E402
from factorkit.solvers.dictionary import dictionary_budget, sparse_dictionary  # noqa: E402
from factorkit.solvers.whitening import cholesky_factor  # noqa: E402
from factorkit.surgery import find_blocks, linear_weight, target_linears  # noqa: E402


class _Done(Exception):
    """Raised once the chosen block is measured: nothing after it is needed."""


SOLVES = ("probe", "full", "full_svd", "full_refined")


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (no ties expected among continuous errors)."""
    ra = torch.tensor(a).argsort().argsort().double()
    rb = torch.tensor(b).argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--block", type=int, default=None, help="block index (default: the middle one)")
    ap.add_argument("--probe-iterations", type=int, default=fk.AutoConfig().probe_iterations)
    ap.add_argument("--full-iterations", type=int, default=8, help="the benchmarks' CoSpaDi alternations")
    ap.add_argument("--solves", default=",".join(SOLVES),
                    help=f"the reference fits to run, comma separated among {', '.join(SOLVES)}")
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args()
    args.solves = [w for w in args.solves.split(",") if w]
    if any(w not in SOLVES for w in args.solves):
        ap.error(f"--solves takes {', '.join(SOLVES)}, comma separated")
    base, tok = fk.models.load(args.model)
    blocks = find_blocks(base)[1]
    middle = len(blocks) // 2
    block = middle if args.block is None else args.block
    settings = {"model": args.model, "block": block, "probe_iterations": args.probe_iterations,
                "full_iterations": args.full_iterations}
    name = f"probe-{args.model}" if block == middle else f"probe-{args.model}-block{block}"
    settings["name"] = name
    results = Results(name, {k: v for k, v in settings.items() if k != "name"})
    if not args.report:
        measure(results, base, tok, block, args)
    report(results, settings)


def measure(results: Results, base, tok, block: int, args) -> None:
    results.put("machine", {"text": machine()})
    data = calibration_tokens(tok, "general", 32, 512, 0)
    bits = 8 * next(base.parameters()).element_size()

    def on_block(index, block_name, module, stats) -> None:
        if index != block:
            return
        for name in target_linears(module, None):
            weight = linear_weight(module.get_submodule(name)).detach()
            m, n = weight.shape
            gram = stats[name].gram
            whitened = weight.double() @ cholesky_factor(gram).factor
            u, sv, vh = torch.linalg.svd(whitened, full_matrices=False)
            for q in PROBE_RATIOS:
                key = f"{name}@{q}"
                k, s = dictionary_budget(n, m, q, 2.0, count="storage", value_bits=bits)
                t = time.perf_counter()
                eigen = eigenbasis_errors(u * sv, float(sv.square().sum()), [(k, s)])[0]
                eigen_s = time.perf_counter() - t
                t = time.perf_counter()
                refined = refined_errors(whitened, u, sv, vh, [(k, s)])[0]
                refined_s = time.perf_counter() - t
                row = {**results[key]} if key in results else {}
                row.update(eigen=eigen, eigen_s=eigen_s, refined=refined, refined_s=refined_s)
                results.put(key, row)
                # the probe and the full solve from random signals (as measured first), the full solve from
                # the SVD start (what auto and cospadi now do by default)
                for what, iters, refresh, start in (("probe", args.probe_iterations, "every", "signals"),
                                                   ("full", args.full_iterations, "doubling", "signals"),
                                                   ("full_svd", args.full_iterations, "doubling", "svd"),
                                                   ("full_refined", args.full_iterations, "doubling", "refined")):
                    if what in row or what not in args.solves:
                        continue
                    t = time.perf_counter()
                    fit = sparse_dictionary([weight], k, s, gram=gram, iterations=iters, refresh=refresh,
                                            start=start)[0]
                    row[what] = fit.errors[-1]
                    row[f"{what}_s"] = time.perf_counter() - t
                    results.put(key, row)
                    print(key, what, row[what], f"{row[what + '_s']:.1f} s", flush=True)
        raise _Done

    try:
        calibrate_blockwise(base, data, on_block, stats=("gram",), sequential=False, progress=True, desc="profile")
    except _Done:
        pass


def report(results: Results, settings: dict) -> None:
    items = {k: v for k, v in results.items.items() if "@" in k and ("full" in v or "full_svd" in v)}
    if not items:
        print("no results yet")
        return
    names = list(dict.fromkeys(k.split("@")[0] for k in items))
    rows = []
    for name in names:
        keys = [k for k in items if k.split("@")[0] == name]
        rows.append([name, *(" / ".join(f"{items[k][w]:.4f}" if w in items[k] else "-"
                                        for w in ("eigen", "refined", "probe", "full", "full_svd", "full_refined"))
                                 for k in keys)])
    lines = []
    for what, label, against, against_label in (
            ("eigen", "eigenbasis estimate", "full", "full solve from random signals"),
            ("probe", f"probe ({settings['probe_iterations']} alternations)", "full",
             "full solve from random signals"),
            ("eigen", "eigenbasis estimate", "full_svd", "full solve from the SVD start"),
            ("refined", "refined estimate", "full_svd", "full solve from the SVD start")):
        if not all(what in v and against in v for v in items.values()):
            continue
        est = [items[k][what] for k in items]
        ref = [items[k][against] for k in items]
        over = [e / f for e, f in zip(est, ref)]
        # the knapsack compares predicted losses (sensitivity x error^2 x energy) across matrices: the
        # ordering of the errors themselves is what it needs within a matrix, their ratio across matrices
        lines.append(f"- {label} against the {against_label}: Spearman {spearman(est, ref):.3f} over all "
                     f"{len(items)} options; it overstates that error by {min(over):.2f}x to {max(over):.2f}x "
                     f"(mean {sum(over) / len(over):.2f}x); {sum(items[k][what + '_s'] for k in items):.1f} s "
                     "in all.")
    for new, old, label in (("full_svd", "full", "The SVD start (`start=\"svd\"`, the default) against random "
                                                  "signals (`start=\"signals\"`)"),
                            ("full_refined", "full_svd", "The refined start (`start=\"refined\"`) against the SVD "
                                                         "start")):
        if not all(new in v and old in v for v in items.values()):
            continue
        gain = [items[k][new] / items[k][old] for k in items]
        secs = [sum(items[k][w] for k in items) for w in (f"{old}_s", f"{new}_s")]
        lines.append(f"- {label}, both {settings['full_iterations']} alternations: error x{min(gain):.3f} to "
                     f"x{max(gain):.3f} (mean x{sum(gain) / len(gain):.3f}; lower in {sum(g < 1 for g in gain)} "
                     f"of {len(gain)} options), {secs[1]:.0f} s against {secs[0]:.0f} s in all (two runs: the "
                     "seconds are rough).")
    ran = results.machine(results.items.get("machine", {}).get("text"))
    ratios = sorted({float(k.split("@")[1]) for k in items})
    table = markdown_table(["matrix", *(f"ratio {q}: eigen / refined / probe / full / full (svd start) / "
                                        "full (refined start)"
                                        for q in ratios)],
                           rows)
    partial = "" if len(items) == 7 * len(PROBE_RATIOS) else (
        f" ({len(items)} of the block's options measured so far; the run resumes where it stopped)")
    name = settings["name"]
    command = f"python benchmarks/bench_probe.py --model {settings['model']}"
    if name != f"probe-{settings['model']}":
        command += f" --block {settings['block']} --solves full_svd,full_refined"
    write_section(name, f"""
## {settings['model']}, block {settings['block']}: pricing dictionary options cheaply, against the full solve

`{command}`, {results.measured()}, {ran}.

Block {settings['block']}, calibrated on 32 x 512 tokens of the `general` corpus (the dense model's activations,
as `auto`'s profile sees them). Relative whitened error of a sparse dictionary (rho 2, bytes counted with the
support) at each ratio the profile probes: the eigenbasis estimate (`--estimate eigenbasis`), the refined
estimate (`--estimate refined`, `auto`'s default since these runs: from the eigenbasis code, least-squares atoms, then twice the codes
re-supported and improved and the atoms re-fitted; `methods.auto.refined_errors`), a CoSpaDi fit of
{settings['probe_iterations']} alternations from random weight rows (`--estimate probe`, as first measured), and the full solve of {settings['full_iterations']}
alternations the benchmarks run, started from random weight rows (`start="signals"`, as first measured) and
from the SVD start (`start="svd"`, the default since: the eigenbasis estimate's own dictionary and codes, which
the alternations only improve on, so that estimate bounds the full solve's error from above) and from the
refined start (`start="refined"`: the refined estimate's dictionary and codes){partial}.

{table}

{chr(10).join(lines)}
""")
    print(table)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
