"""CoSpaDi past one process: solve time against matrix size, and one against two processes.

1. Scaling: one whitened CoSpaDi solve (`solvers.dictionary.sparse_dictionary`, ratio 0.2, rho 2, the
   alternations of bench_eval.py, doubling refresh) of a random (n x n) matrix with the Gram of random inputs,
   at several n, one thread; a least-squares fit of log time against log n gives the exponent, used to scale
   the solve times to Llama-3-70B's shapes (the plan in README.md).
2. Offload: peak resident memory of `factorkit compress` on SmolLM2-135M with and without `--offload`, and
   whether the saved tensors are identical.
3. Processes: `factorkit compress --method cospadi` of the first blocks of SmolLM2-135M (its real weights and
   shapes; the other blocks cut so that the run takes minutes) on one process and under
   `torchrun --nproc-per-node 2`, each process on one thread, side by side, and whether the saved tensors are
   identical. Needs both cores free.

    python benchmarks/bench_parallel.py [--sizes 192,288,384,576,768,1152,1536] [--blocks 2] [--offload svdllm,cospadi]
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Results, machine, write_section  # noqa: E402

from factorkit import kernels  # noqa: E402
from factorkit.report import markdown_table  # noqa: E402
from factorkit.solvers.dictionary import dictionary_budget, sparse_dictionary  # noqa: E402

ITERATIONS = 8  # as bench_eval.py
RATIO = 0.2
# Llama-3-70B: 80 blocks of q/o 8192x8192, k/v 1024x8192, gate/up 28672x8192, down 8192x28672
LLAMA70B = {"q/o": (8192, 8192, 2), "k/v": (1024, 8192, 2), "gate/up": (28672, 8192, 2), "down": (8192, 28672, 1)}
LLAMA70B_BLOCKS = 80
LLAMA70B_VOCAB, LLAMA70B_HIDDEN = 128256, 8192
PLAN_WINDOWS, PLAN_SEQ = 128, 2048  # calibration windows of the plan
PROCESSES = 8


def memory_plan() -> dict[str, float]:
    """GB that --offload holds for Llama-3-70B: embedding and head (bfloat16; only while the calibration windows
    are embedded, before the first block), one block in bfloat16 and in float32 while solved, the calibration
    hidden states in and out of a block (bfloat16), the block's Grams (float64: one per distinct input, q/k/v,
    o, gate/up of width 8192 and down of width 28672)."""
    block = sum(o * i * count for o, i, count in LLAMA70B.values())
    gb = 1e9
    return {"embedding and head": 2 * LLAMA70B_VOCAB * LLAMA70B_HIDDEN * 2 / gb,
            "block, float32": block * 4 / gb,
            "hidden states in and out": 2 * PLAN_WINDOWS * PLAN_SEQ * LLAMA70B_HIDDEN * 2 / gb,
            "Grams, float64": (3 * 8192 ** 2 + 28672 ** 2) * 8 / gb,
            "model in memory, bfloat16": (block * LLAMA70B_BLOCKS + 2 * LLAMA70B_VOCAB * LLAMA70B_HIDDEN) * 2 / gb}


def processes_plan(hours: dict[str, float]) -> float:
    """Hours per block when PROCESSES processes share its solves whole (largest first to the least loaded)."""
    from factorkit.parallel import Team

    costs = [hours[name] for name, (_, _, count) in LLAMA70B.items() for _ in range(count)]
    owners = Team(0, PROCESSES).owners(costs)
    return max(sum(c for c, o in zip(costs, owners) if o == r) for r in range(PROCESSES))


def solve_seconds(out_f: int, in_f: int) -> float:
    gen = torch.Generator().manual_seed(out_f * 7 + in_f)
    W = torch.randn(out_f, in_f, generator=gen) / in_f ** 0.5
    X = torch.randn(4 * in_f, in_f, generator=gen) @ (torch.randn(in_f, in_f, generator=gen) / in_f ** 0.5)
    gram = (X.T @ X).double()
    k, s = dictionary_budget(in_f, out_f, RATIO)
    t = time.perf_counter()
    sparse_dictionary([W], k, s, gram=gram, iterations=ITERATIONS, refresh="doubling", seed=0)
    return time.perf_counter() - t


# Solve times are kept per solver: the torch version's (measured first, under these names) and the compiled
# kernels' (factorkit.kernels, solver.cpp), which the plan scales from when they are measured.
PREFIX = {"torch": "scaling", "compiled": "scaling-compiled"}


def solver() -> str:
    return "torch" if kernels.dictionary() is None else "compiled"


def measure_scaling(results: Results, sizes: list[int]) -> None:
    prefix = PREFIX[solver()]
    shapes = ([(f"{prefix}/{n}", n, n) for n in sizes]
              + [(f"{prefix}-rect/{o}x{i}", o, i) for o, i in RECTANGLES])
    for key, out_f, in_f in shapes:
        if key not in results:
            results.put(key, {"seconds": solve_seconds(out_f, in_f), "load": os.getloadavg()[0]})
            print(key, results[key], flush=True)


def fit(results: Results, prefix: str) -> tuple[float, float, list[int]] | None:
    """(exponent b, constant a, sizes fitted) of seconds = a n^b over the three largest square sizes measured
    under ``prefix`` (at small sizes fixed costs flatten the curve)."""
    points = sorted((int(k.split("/")[1]), v["seconds"]) for k, v in results.items.items()
                    if k.startswith(f"{prefix}/"))
    points = points[-3:]
    if len(points) < 2:
        return None
    xs, ys = [math.log(n) for n, _ in points], [math.log(t) for _, t in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return b, math.exp(my - b * mx), [n for n, _ in points]


SIGMA = dictionary_budget(1000, 1000, RATIO)[1] / 1000  # nonzeros per row / n of a square matrix


def _days_of(results: Results, prefix: str) -> str:
    days = sorted({results.dates[k] for k in results.items if k.startswith(f"{prefix}/")})
    return days[0] if len(days) == 1 else f"{days[0]} to {days[-1]}"


def predicted(a: float, b: float, out_f: int, in_f: int) -> float:
    """A solve of an (out x in) matrix from the square fit a n^b read as out rows, each costing as a row of the
    square matrix with the same nonzeros per row s: a * out * (s / SIGMA)^(b - 1) (sparse coding, whose cost
    per row grows with s, dominates)."""
    s = dictionary_budget(in_f, out_f, RATIO)[1]
    return a * out_f * (s / SIGMA) ** (b - 1)


RECTANGLES = ((1536, 384), (384, 1536))  # 4:1 and 1:4, as gate/up and down


def truncated_model(blocks: int, folder: Path) -> None:
    from factorkit.models import load

    model, tok = load("smollm2-135m")
    model.model.layers = model.model.layers[:blocks]
    model.config.num_hidden_layers = blocks
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:blocks]
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


def measure_processes(results: Results, blocks: int) -> None:
    key = f"processes/{blocks}"
    if key in results:
        return
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        truncated_model(blocks, tmp / "model")
        args = ["-q", "compress", "--model", str(tmp / "model"), "--method", "cospadi", "--ratio", str(RATIO),
                "--iterations", str(ITERATIONS), "--calib", "general"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        row = {"load": os.getloadavg()[0]}
        for label, launcher in (("1 process", [sys.executable, "-m", "factorkit.cli"]),
                                ("2 processes", [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                                                 "2", "-m", "factorkit.cli"])):
            out = tmp / label.replace(" ", "-")
            argv = launcher + args + ["--out", str(out)]
            t = time.perf_counter()
            subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL)
            row[label] = time.perf_counter() - t
            print(label, f"{row[label]:.1f} s", flush=True)
        one, two = (load_file(tmp / name / "model.safetensors") for name in ("1-process", "2-processes"))
        row["identical"] = one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
        results.put(key, row)


def peak_rss(argv: list[str]) -> tuple[float, int]:
    """(wall seconds, peak resident bytes) of a command, from /usr/bin/time -v."""
    t = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-v", *argv], env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    kib = next(int(line.split(":")[1]) for line in done.stderr.splitlines() if "Maximum resident set size" in line)
    return time.perf_counter() - t, kib * 1024


def measure_floor(results: Results) -> None:
    """Peak resident bytes of importing what every compress run imports (Python, torch, transformers with the
    model classes, torchao, factorkit): the part of each peak that no model or option changes."""
    if "offload-floor" in results:
        return
    code = "import factorkit.cli, transformers.models.llama.modeling_llama"
    results.put("offload-floor", {"peak_bytes": peak_rss([sys.executable, "-c", code])[1]})


def warm_caches() -> None:
    """Make the one-time caches (the model converted to safetensors, the corpus and its token ids) before the
    measured runs, so that no measured peak holds their making."""
    import transformers

    from factorkit.data import calibration_tokens
    from factorkit.models.hub import builtin_path

    calibration_tokens(transformers.AutoTokenizer.from_pretrained(builtin_path("smollm2-135m")), "general")


def measure_offload(results: Results, method: str, iterations: int) -> None:
    key = f"offload/{method}"
    if key in results:
        return
    from safetensors.torch import load_file

    warm_caches()
    measure_floor(results)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        args = [sys.executable, "-m", "factorkit.cli", "-q", "compress", "--model", "smollm2-135m", "--method",
                method, "--ratio", str(RATIO), "--calib", "general"]
        if method == "cospadi":
            args += ["--iterations", str(iterations)]
        row = {"load": os.getloadavg()[0], "iterations": iterations if method == "cospadi" else None}
        for label, extra in (("in memory", []), ("offload", ["--offload"])):
            seconds, peak = peak_rss(args + extra + ["--out", str(tmp / label.replace(" ", "-"))])
            row[label] = {"seconds": seconds, "peak_bytes": peak}
            print(key, label, row[label], flush=True)
        one, two = (load_file(tmp / name / "model.safetensors") for name in ("in-memory", "offload"))
        row["identical"] = one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
        results.put(key, row)


def report(results: Results) -> None:
    parts = []
    offloads = [(k.split("/")[1], r) for k, r in results.items.items() if k.startswith("offload/")]
    if offloads:
        floor = results.items.get("offload-floor", {}).get("peak_bytes", 0)
        rows = [[method + (f" ({r['iterations']} alternation{'s' * (r['iterations'] != 1)})"
                           if r.get("iterations") else ""),
                 f"{r['in memory']['peak_bytes'] / 2**20:.0f}", f"{r['offload']['peak_bytes'] / 2**20:.0f}",
                 f"{r['offload']['peak_bytes'] / r['in memory']['peak_bytes']:.2f}",
                 f"{(r['offload']['peak_bytes'] - floor) / (r['in memory']['peak_bytes'] - floor):.2f}"
                 if floor else "-",
                 f"{r['in memory']['seconds']:.0f}", f"{r['offload']['seconds']:.0f}",
                 "yes" if r["identical"] else "NO"] for method, r in offloads]
        floor_text = (f" The imports alone (`python -c \"import factorkit.cli, "
                      f"transformers.models.llama.modeling_llama\"`) peak at {floor / 2**20:.0f} MiB, whatever the model: "
                      "\"above imports\" compares what is left, the part that grows with the model." if floor else "")
        parts.append(f"""**Offloaded compression** (`factorkit compress --model smollm2-135m --method M --ratio {RATIO} --calib
general`, with and without `--offload`, the model and token caches made beforehand; peak resident memory of the
whole process from `/usr/bin/time -v`, Python, torch and transformers included).{floor_text}

{markdown_table(["method", "peak MiB in memory", "peak MiB offloaded", "offloaded / in memory",
                 "offloaded / in memory, above imports", "wall s in memory", "wall s offloaded",
                 "saved tensors identical"], rows)}""")
    path = "compiled" if fit(results, PREFIX["compiled"]) else "torch"
    prefix = PREFIX[path]
    scaled = fit(results, prefix)
    if scaled:
        b, a, sizes = scaled
        every = sorted(int(k.split("/")[1]) for k in results.items if k.startswith(f"{prefix}/"))
        torch_fit = fit(results, PREFIX["torch"]) if path == "compiled" else None
        rows = [[n, f"{results[f'{prefix}/{n}']['seconds']:.2f}", f"{a * n ** b:.2f}" if n in sizes else "-"]
                + ([f"{results[f'scaling/{n}']['seconds']:.2f}" if f"scaling/{n}" in results else "-"]
                   if torch_fit else [])
                for n in every]
        total = sum(predicted(a, b, o, i) * count for o, i, count in LLAMA70B.values()) * LLAMA70B_BLOCKS
        per_block = processes_plan({name: predicted(a, b, o, i) / 3600 for name, (o, i, _) in LLAMA70B.items()})
        memory = memory_plan()
        solving = {k: v for k, v in memory.items() if not k.startswith(("model", "embedding"))}
        rect = "; ".join(f"{o}x{i}: measured {r['seconds']:.1f} s, predicted {predicted(a, b, o, i):.1f} s"
                         for o, i in RECTANGLES if (r := results.items.get(f"{prefix}-rect/{o}x{i}")))
        before = (f" The torch version of the solver (measured {_days_of(results, PREFIX['torch'])}, the last column) "
                  f"took seconds = {torch_fit[1]:.3g} n^{torch_fit[0]:.2f}: "
                  f"{torch_fit[1] * sizes[-1] ** torch_fit[0] / (a * sizes[-1] ** b):.1f}x the compiled kernels' "
                  f"time at n = {sizes[-1]}." if torch_fit else "")
        shapes = [[name, f"{o}x{i}", f"{predicted(a, b, o, i) / 3600:.2f}"] for name, (o, i, _) in LLAMA70B.items()]
        solver_text = ("the compiled kernels of `factorkit.kernels`" if path == "compiled" else
                       "the solver's torch version")
        parts.append(f"""**Solve time against size** (one whitened CoSpaDi solve of a random n x n matrix, ratio {RATIO},
rho 2, {ITERATIONS} alternations, doubling refresh, one thread, {solver_text}): seconds = {a:.3g} n^{b:.2f},
fitted by least squares on log-log over n = {", ".join(map(str, sizes))}.{before}

{markdown_table(["n", "measured s", "fit s"] + (["torch solver s"] if torch_fit else []), rows)}

Rectangular matrices, read as out rows each costing as a row of the square matrix with the same nonzeros per
row s (seconds = a out (s / {SIGMA:.3f})^(b-1), sparse coding dominating): {rect}.

Scaled to Llama-3-70B's shapes that way (one CPU thread):

{markdown_table(["matrix", "shape", "hours per solve"], shapes)}

{total / 3600 / LLAMA70B_BLOCKS:,.0f} h per block; all {LLAMA70B_BLOCKS} blocks: {total / 3600:,.0f} single-thread CPU hours. Shared whole among {PROCESSES}
processes (torchrun; largest first to the least loaded) a block takes {per_block:,.0f} h: {LLAMA70B_BLOCKS} blocks in
{LLAMA70B_BLOCKS * per_block:,.0f} h, {total / 3600 / (LLAMA70B_BLOCKS * per_block):.1f}x one process. To finish in a
day on {PROCESSES} GPUs with the rows of each solve split among them, each GPU would need
{total / 3600 / PROCESSES / 24:,.0f}x the speed of one CPU thread.

Memory that `--offload` holds for Llama-3-70B ({PLAN_WINDOWS} calibration windows of {PLAN_SEQ} tokens) while a
block is solved, GB: {", ".join(f"{k} {v:.1f}" for k, v in solving.items())}; together {sum(solving.values()):.1f},
against {memory["model in memory, bfloat16"]:.0f} for the model alone in memory. The embedding and head
({memory["embedding and head"]:.1f}) are in memory only while the calibration windows are embedded, before the
first block is read.""")
    for key, row in results.items.items():
        if key.startswith("processes/"):
            parts.append(f"""**One process against two** (`factorkit compress --method cospadi --ratio {RATIO} --iterations
{ITERATIONS} --calib general` on SmolLM2-135M cut to its first {key.split('/')[1]} blocks; the second run under
`torchrun --nproc-per-node 2`; one thread per process): {row['1 process']:.0f} s against {row['2 processes']:.0f} s,
{row['1 process'] / row['2 processes']:.2f}x faster; saved tensors identical: {'yes' if row['identical'] else 'NO'}.""")
    if parts:
        load = max(r.get("load") or 0.0 for r in results.items.values())
        shared = f" The load average was {load:.1f} during these runs." if load > 0.5 else ""
        write_section("parallel", f"""## CoSpaDi past one process

`python benchmarks/bench_parallel.py` ({results.measured()}; {results.machine()}).{shared}

""" + "\n\n".join(parts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="192,288,384,576,768,1152,1536")
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--skip-processes", action="store_true")
    ap.add_argument("--offload", default="svdllm", help="methods whose offloaded peak memory to measure")
    ap.add_argument("--offload-iterations", type=int, default=1, help="CoSpaDi's alternations in that run")
    args = ap.parse_args()
    results = Results("parallel", {"ratio": RATIO, "iterations": ITERATIONS})
    if not args.report:
        measure_scaling(results, [int(n) for n in args.sizes.split(",")])
        for method in filter(None, args.offload.split(",")):
            measure_offload(results, method, args.offload_iterations)
        if not args.skip_processes:
            measure_processes(results, args.blocks)
    report(results)


if __name__ == "__main__":
    main()
