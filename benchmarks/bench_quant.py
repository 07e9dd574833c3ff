"""Factorization against quantization, and the two together, at equal stored bytes of the whole model.

What users pick instead of a factorization is weight-only quantization. For the dense model and for each
factorization at ratios 0.2 / 0.4 (calibrated on the general corpus, as in bench_eval.py), this measures the
float model, then the same model quantized by `factorkit.quantize` (torchao, round to nearest: int8 with a
scale per row, int4 with a scale per 32 numbers): perplexity on the held-out general text and the held-out
plays, the zero-shot suite, and the bytes the whole saved model holds (`factorkit.stored_bytes`: embeddings,
norms and support masks included). One run per model, side by side; resumable (results/quant-<model>.json);
writes the `quant-<model>` section of BENCHMARKS.md and a Pareto plot (bytes against perplexity).

    python benchmarks/bench_quant.py --model smollm2-135m [--methods svdllm-global,auto] [--ratios 0.2]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_eval import SETTINGS, add_point_arguments, fmt_ppl, methods, shared_note  # noqa: E402
from common import RESULTS, Results, held_out, machine, run_point, write_section  # noqa: E402

import factorkit as fk  # noqa: E402
from factorkit.eval import TASKS, zero_shot  # noqa: E402
from factorkit.report import markdown_table  # noqa: E402

RATIOS = (0.2, 0.4)
SCHEMES = ("float", "int8", "int4")
# the LM head (and the embeddings tied to it) quantized too: measured on the dense model, and on the
# factorizations with --head
HEAD_SCHEMES = ("int8-head", "int4-head")
GROUP_SIZE = 32
METHODS = ("svdllm-global", "fwsvd-white-global", "auto", "cospadi")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_point_arguments(ap)
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated factorizations (bench_eval names)")
    ap.add_argument("--ratios", default=",".join(map(str, RATIOS)))
    ap.add_argument("--head", action="store_true", help="also quantize the factorizations' LM heads (the dense "
                                                        "model's always is)")
    args = ap.parse_args()
    settings = {k: getattr(args, k) for k in SETTINGS}
    settings["group_size"] = GROUP_SIZE
    table = methods(args.cospadi_iterations)
    chosen = args.methods.split(",")
    unknown = [m for m in chosen if m not in table]
    if unknown:
        ap.error(f"unknown method {unknown[0]!r}; choose from {', '.join(table)}")
    ratios = tuple(float(r) for r in args.ratios.split(","))
    results = Results(f"quant-{args.model}", settings, fresh=args.fresh)
    if not args.report:
        measure(results, settings, {m: table[m] for m in chosen}, ratios, args.head)
    report(results, settings)


def key(name: str, scheme: str, ratio: float | None = None) -> str:
    return f"{name}{'' if ratio is None else f'@{ratio}'}+{scheme}"


def measure(results: Results, settings: dict, chosen: dict, ratios: tuple[float, ...], head: bool = False) -> None:
    results.put("machine", {"text": machine(), "shared": shared_note()})
    base, tok = fk.models.load(settings["model"])
    job = fk.CompressJob(model=settings["model"], calib="general", eval="general", eval_before=False, seed=0,
                         **{k: settings[k] for k in ("calib_samples", "calib_seq_len", "seq_len", "max_chunks")})

    def evaluate(model) -> dict:
        t = time.perf_counter()
        general = held_out(model, tok, job).perplexity
        plays = held_out(model, tok, dataclasses.replace(job, eval="shakespeare")).perplexity
        suite = zero_shot(model, tok, TASKS, limit=settings["limit"], progress=False)
        return {"ppl_general": general.perplexity, "ppl_plays": plays.perplexity, "zero_shot": suite.as_dict(),
                "bytes": fk.stored_bytes(model), "eval_s": time.perf_counter() - t}

    def schemes(name: str, model, ratio: float | None, extra: dict, which: tuple[str, ...]) -> None:
        """The float model, then a copy of it quantized with each scheme."""
        for scheme in which:
            k = key(name, scheme, ratio)
            if k in results:
                continue
            if scheme == "float":
                item = evaluate(model)
            else:
                quantized = copy.deepcopy(model)
                rep = fk.quantize(quantized, scheme.removesuffix("-head"), GROUP_SIZE, head=scheme.endswith("-head"))
                item = {**evaluate(quantized), "quantize_s": rep.seconds, "tensors": len(rep.tensors),
                        "by_columns": len(rep.by_columns), "int8_fallback": len(rep.int8_fallback)}
                del quantized
            results.put(k, {**item, **extra})
            print(k, f"{item['bytes'] / 2**20:.1f} MiB, general ppl {item['ppl_general']:.4g}, "
                     f"zero-shot {100 * item['zero_shot']['average']:.2f}", flush=True)

    schemes("dense", base, None, {}, SCHEMES + HEAD_SCHEMES)
    which = SCHEMES + HEAD_SCHEMES if head else SCHEMES
    for ratio in ratios:
        for name, make in chosen.items():
            if all(key(name, s, ratio) in results for s in which):
                continue
            # the same compression as bench_eval's point (measured below, not by the job)
            model, rep = run_point(base, tok, dataclasses.replace(job, eval=None), make(ratio))
            schemes(name, model, ratio, {"compress_s": rep.compression.seconds,
                                         "ratio_targeted": rep.compression.summary.ratio_targeted}, which)
            del model


def points(results: Results) -> list[tuple[str, str, dict]]:
    """(label, scheme, item) of every stored point."""
    out = []
    for k, item in results.items.items():
        if "+" in k and "bytes" in item:
            label, scheme = k.rsplit("+", 1)
            out.append((label, scheme, item))
    return out


def dominated(item: dict, quant_only: list[tuple[str, dict]]) -> tuple[str, dict] | None:
    """The quantization-alone point that has no more bytes and no higher perplexity, if there is one."""
    for label, q in quant_only:
        if q["bytes"] <= item["bytes"] and q["ppl_general"] <= item["ppl_general"]:
            return label, q
    return None


def verdicts(pts: list[tuple[str, str, dict]]) -> list[str]:
    """One line per factorization point: beaten by quantization alone at no more bytes, or not."""
    quant_only = [(f"dense {s}", item) for label, s, item in pts if label == "dense"]
    smallest_label, smallest = min(quant_only, key=lambda lq: lq[1]["bytes"], default=(None, None))
    lines = []
    for label, scheme, item in sorted(pts, key=lambda p: p[2]["bytes"]):
        if label == "dense":
            continue
        name = f"{label} {scheme}"
        size = f"{item['bytes'] / 2**20:.1f} MiB, general ppl {fmt_ppl(item['ppl_general'])}"
        beaten = dominated(item, quant_only)
        if beaten:
            q = beaten[1]
            lines.append(f"- {name} ({size}): beaten by {beaten[0]} ({q['bytes'] / 2**20:.1f} MiB, "
                         f"ppl {fmt_ppl(q['ppl_general'])}).")
        elif smallest is not None and item["bytes"] < smallest["bytes"]:
            worse = item["ppl_general"] / smallest["ppl_general"]
            lines.append(f"- {name} ({size}): {1 - item['bytes'] / smallest['bytes']:.0%} fewer bytes than the "
                         f"smallest quantization alone here ({smallest_label}, {smallest['bytes'] / 2**20:.1f} MiB), at "
                         + (f"{worse:.2f}x its perplexity: smaller, not better at equal bytes."
                            if worse > 1 else f"{worse:.2f}x its perplexity: smaller and better."))
        else:
            lines.append(f"- {name} ({size}): no quantization alone here is both smaller and better.")
    return lines


def report(results: Results, settings: dict) -> None:
    pts = points(results)
    dense = results.items.get("dense+float")
    if dense is None:
        print("no results yet")
        return
    model = settings["model"]
    ran = results.items.get("machine", {})
    where = results.machine(ran.get("text")) + (f"; {ran['shared']}" if ran.get("shared") else "")
    rows = []
    for label, scheme, item in sorted(pts, key=lambda p: -p[2]["bytes"]):
        z = item["zero_shot"]
        rows.append([label, scheme, f"{item['bytes'] / 2**20:.1f}", f"{item['bytes'] / dense['bytes']:.3f}",
                     fmt_ppl(item["ppl_general"]), f"{item['ppl_general'] / dense['ppl_general']:.3g}x",
                     fmt_ppl(item["ppl_plays"]), f"{100 * z['average']:.2f} ± {100 * z['average_stderr']:.2f}",
                     f"{100 * (z['average'] - dense['zero_shot']['average']):+.2f}"])
    main_table = markdown_table(["model", "weights", "stored MiB (whole model)", "vs dense float", "general ppl",
                                 "vs dense", "plays ppl", "zero-shot acc avg (%)", "vs dense (points)"], rows)
    plot(pts, model)
    zs = dense["zero_shot"]
    write_section(f"quant-{model}", f"""
## {model}: factorization against quantization, and both, by stored bytes

`python benchmarks/bench_quant.py --model {model}`, {results.measured()}, {where}.

Weights: `float` as compressed (float32); `int8` and `int4` the same model after
`factorkit.quantize` (torchao {_torchao_version()}, round to nearest, symmetric: int8 one scale per row, int4 one
scale per {settings['group_size']} numbers) of every weight matrix in the blocks: the Linears left dense and the
factors (U, V; dictionary atoms and code values). Embeddings (tied to the LM head), norms and support masks stay
as they are, except in `int8-head` and `int4-head` (`quantize(..., head=True)`, `--quantize-head`): the LM head
and the embeddings tied to it quantized too, one scale per vocabulary row (int4: per 32 numbers). "Stored MiB" is what the saved model.safetensors holds for the whole model (int4 packed two per
byte, scales and zero points included). Compression as in bench_eval.py: {settings['calib_samples']} windows of
{settings['calib_seq_len']} tokens of the `general` calibration split. Perplexity: held-out `general` and held-out
plays, {settings['max_chunks']} chunks of {settings['seq_len']}; zero-shot: lm-eval {zs['lm_eval_version']}, first
{settings['limit']} documents of each of the 8 tasks (two averages differ beyond noise only by about
{280 * zs['average_stderr']:.1f} points).

{main_table}

Each factorization point against quantization alone (a point is beaten when dense int8 or int4 stores no more
bytes at no higher general-text perplexity):

{chr(10).join(verdicts(pts))}

GPTQ: no maintained CPU-capable implementation installs beside this stack (llm-compressor 0.14 pins
transformers<=5.17, this stack runs 5.24; GPTQModel 7.7 pulls torch 2.14 with CUDA), so it is not in this table.

![perplexity against stored bytes](benchmarks/results/quant-{model}.png)
""")
    print(main_table)


def _torchao_version() -> str:
    from importlib.metadata import version

    return version("torchao")


def plot(pts: list[tuple[str, str, dict]], model: str) -> None:
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    markers = {"float": "o", "int8": "s", "int4": "^", "int8-head": "P", "int4-head": "v"}
    labels = sorted({label.split("@")[0] for label, _, _ in pts}, key=lambda n: (n != "dense", n))
    for i, name in enumerate(labels):
        for scheme in SCHEMES + HEAD_SCHEMES:
            mine = sorted((item for label, s, item in pts if label.split("@")[0] == name and s == scheme),
                          key=lambda item: item["bytes"])
            if mine:
                ax.plot([p["bytes"] / 2**20 for p in mine], [p["ppl_general"] for p in mine], marker=markers[scheme],
                        color="black" if name == "dense" else f"C{i % 10}", ls=":" if scheme != "float" else "-",
                        label=f"{name} {scheme}", ms=9 if name == "dense" else 6)
    ax.set(xlabel="stored MiB of the whole model", ylabel="perplexity, held-out general text (log)", yscale="log",
           title=f"{model}: perplexity against stored bytes")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(RESULTS / f"quant-{model}.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
