"""Layer latency of the factor modules' kernels against nn.Linear, side by side in one process.

Random factors at ratio 0.2 (DictionaryLinear at CoSpaDi's rho = 2 by the paper's count, LowRankLinear at the
rank of the same parameter count) on LLaMA-7B's three shapes and SmolLM2-135M's four, at 1 to 2048 tokens, in
float32 and bfloat16. Every cell is the best wall time over repeated calls; the table gives each
kernel's speed as a ratio to nn.Linear (above 1: faster) beside the ideal ratio, dense bytes / stored bytes
(what a kernel bound by reading its weights could reach). Resumable: rerun to finish an interrupted run.
The compiled kernels differ by instruction set, so each build keeps its own results and section: `kernels`
(AVX-512), `kernels-avx2`, `kernels-scalar`, `kernels-torch` (not built).

    python benchmarks/bench_kernels.py            # measure what is missing, then rewrite BENCHMARKS.md
    python benchmarks/bench_kernels.py --parts layers,e2e   # only those tables
    python benchmarks/bench_kernels.py --report   # only rewrite BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported: one thread, as the table says

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from common import Results, compiled_kernels_off, machine, write_section  # noqa: E402

from factorkit import kernels  # noqa: E402
from factorkit.eval.latency import best_time  # noqa: E402
from factorkit.eval.speed import held_bytes  # noqa: E402
from factorkit.factors import DictionaryLinear, LowRankLinear  # noqa: E402
from factorkit.report import markdown_table  # noqa: E402
from factorkit.solvers.dictionary import dictionary_budget  # noqa: E402
from factorkit.solvers.lowrank import rank_for_ratio  # noqa: E402

SHAPES = {"LLaMA-7B q/k/v/o 4096x4096": (4096, 4096), "LLaMA-7B gate/up 11008x4096": (11008, 4096),
          "LLaMA-7B down 4096x11008": (4096, 11008), "SmolLM2 q/o 576x576": (576, 576),
          "SmolLM2 k/v 192x576": (192, 576), "SmolLM2 gate/up 1536x576": (1536, 576),
          "SmolLM2 down 576x1536": (576, 1536)}
TOKENS = (1, 2, 8, 16, 64, 256, 2048)  # 8 and 64: around where the kernels take over from each other
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
RATIO = 0.2
# The kernels timed at each token count (the others are far off there and would only cost time).
KERNELS = {"mask": 16, "lanes": 256, "sparse": 16, "codes": 2048}


def stored_bytes(module: nn.Module) -> int:
    """Parameters and persistent buffers (the support mask), as saved."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def build(out_f: int, in_f: int, dtype: torch.dtype) -> tuple[nn.Module, nn.Module, DictionaryLinear]:
    gen = torch.Generator().manual_seed(0)
    k, s = dictionary_budget(in_f, out_f, RATIO)
    r = rank_for_ratio(out_f, in_f, RATIO)
    dense = nn.Linear(in_f, out_f, bias=False)
    lowrank = LowRankLinear.from_factors(torch.randn(out_f, r, generator=gen), torch.randn(r, in_f, generator=gen))
    idx = torch.stack([torch.randperm(k, generator=gen)[:s] for _ in range(out_f)])
    dic = DictionaryLinear.from_codes(torch.randn(k, in_f, generator=gen), idx, torch.randn(out_f, s, generator=gen))
    return tuple(m.to(dtype).requires_grad_(False) for m in (dense, lowrank, dic))  # type: ignore[return-value]


PARTS = ("layers", "e2e", "quant", "quant-dict", "e2e-quant")


def build_name(ext) -> str:
    """The results (and BENCHMARKS.md section) of this machine's build: ``kernels`` for AVX-512, where the
    first table was measured, else ``kernels-<isa>`` (``kernels-torch`` where the kernels are not built)."""
    isa = "torch" if ext is None else ext.isa()
    return "kernels" if isa == "avx512" else f"kernels-{isa}"


def measure(results: Results) -> None:
    ext = kernels.dictionary()
    compiled = kernels.usable(ext)
    for dname, dtype in DTYPES.items():
        for label, (out_f, in_f) in SHAPES.items():
            if all(f"{dname}/{label}/{t}" in results for t in TOKENS):
                continue
            dense, lowrank, dic = build(out_f, in_f, dtype)
            sizes = {"dense": stored_bytes(dense), "lowrank": stored_bytes(lowrank), "dict": stored_bytes(dic)}
            gen = torch.Generator().manual_seed(1)
            for tokens in TOKENS:
                key = f"{dname}/{label}/{tokens}"
                if key in results:
                    continue
                x = torch.randn(1, tokens, in_f, generator=gen).to(dtype)
                repeats = 50 if tokens <= 16 else 5 if tokens <= 256 else 2
                row = {"dense": best_time(dense, x, repeats), "lowrank": best_time(lowrank, x, repeats)}
                for kernel, most in KERNELS.items():
                    if tokens > most or (kernel in ("mask", "lanes") and kernel not in compiled) \
                            or (kernel == "sparse" and dtype != torch.float32):
                        continue
                    dic.kernel = kernel
                    row[f"dict-{kernel}"] = best_time(dic, x, repeats)
                dic.kernel = "auto"
                row["auto-kernel"] = dic.pick_kernel(tokens)
                row["dict-auto"] = best_time(dic, x, repeats)
                row["bytes"] = sizes
                row["load"] = os.getloadavg()[0]
                results.put(key, row)
                print(key, {k: (f"{v * 1e6:.0f}us" if isinstance(v, float) else v) for k, v in row.items()
                            if k != "bytes"}, flush=True)


QUANT_TOKENS = (1, 2, 8)  # the int8 kernel's range (INT8_MAX_TOKENS); beyond it both paths are torchao's
QUANT_SCHEMES = ("int8", "int4")


def measure_quant(results: Results) -> None:
    """A Linear with its weight quantized by factorkit.quantize (int8 per row, int4 per 32 numbers), run by
    factorkit's compiled int8 kernel and by torchao's own path, against the float32 nn.Linear."""
    from factorkit.quantization import QuantizedLinear, quantize_tensor, tensor_bytes

    for label, (out_f, in_f) in SHAPES.items():
        if all(f"quant/{label}/{t}" in results for t in QUANT_TOKENS):
            continue
        torch.manual_seed(0)
        dense = nn.Linear(in_f, out_f, bias=False).requires_grad_(False)
        layers = {}
        for scheme in QUANT_SCHEMES:
            layer = copy.deepcopy(dense)
            layer.weight = nn.Parameter(quantize_tensor(dense.weight, scheme, 32)[0], requires_grad=False)
            layer.__class__ = QuantizedLinear
            layers[scheme] = layer
        sizes = {"dense": tensor_bytes(dense.weight), **{k: tensor_bytes(m.weight, packed=False) for k, m in layers.items()}}
        for tokens in QUANT_TOKENS:
            key = f"quant/{label}/{tokens}"
            if key in results:
                continue
            x = torch.randn(1, tokens, in_f)
            row = {"dense": best_time(dense, x, 50), "bytes": sizes, "load": os.getloadavg()[0]}
            for scheme, layer in layers.items():
                row[scheme] = best_time(layer, x, 50)
                with compiled_kernels_off():
                    row[f"{scheme}-torchao"] = best_time(layer, x, 10)
            results.put(key, row)
            print(key, {k: f"{v * 1e6:.0f}us" for k, v in row.items() if k not in ("bytes", "load")}, flush=True)


E2E_MODEL = "smollm2-135m"
E2E_NEW_TOKENS = 64
E2E_PROMPT = 16
E2E_PREFILL = 512


def dictionary_model(model: nn.Module, ratio: float = RATIO) -> nn.Module:
    """The model with every targeted linear replaced by a random DictionaryLinear at ``ratio`` (speed only)."""
    from factorkit.surgery import find_blocks, replace_module, target_linears

    gen = torch.Generator().manual_seed(0)
    _, blocks = find_blocks(model)
    for block in blocks:
        for name, linear in target_linears(block).items():
            out_f, in_f = linear.weight.shape
            k, s = dictionary_budget(in_f, out_f, ratio)
            idx = torch.stack([torch.randperm(k, generator=gen)[:s] for _ in range(out_f)])
            atoms = torch.randn(k, in_f, generator=gen) / in_f ** 0.5
            replace_module(block, name, DictionaryLinear.from_codes(atoms, idx, torch.randn(out_f, s, generator=gen)
                                                                    / s ** 0.5).to(linear.weight.dtype))
    return model.requires_grad_(False)


def lowrank_model(model: nn.Module, ratio: float) -> nn.Module:
    """The model with every targeted linear replaced by a random LowRankLinear at ``ratio`` (speed only)."""
    from factorkit.surgery import find_blocks, replace_module, target_linears

    gen = torch.Generator().manual_seed(0)
    _, blocks = find_blocks(model)
    for block in blocks:
        for name, linear in target_linears(block).items():
            out_f, in_f = linear.weight.shape
            r = rank_for_ratio(out_f, in_f, ratio)
            replace_module(block, name, LowRankLinear.from_factors(torch.randn(out_f, r, generator=gen) / r ** 0.5,
                                                                   torch.randn(r, in_f, generator=gen) / in_f ** 0.5))
    return model.requires_grad_(False)


def e2e_row(models, results: Results, key: str) -> None:
    """Greedy decode (64 new tokens after a 16-token prompt, batch 1) and a 512-token prefill of each
    (label, model, compiled kernels on?) side by side, and the bytes each holds."""
    import time

    first = models[0][1]
    vocab = first.config.vocab_size
    gen = torch.Generator().manual_seed(2)
    prompt = torch.randint(vocab, (1, E2E_PROMPT), generator=gen)
    long = torch.randint(vocab, (1, E2E_PREFILL), generator=gen)

    def decode(model) -> float:
        with torch.inference_mode():
            t = time.perf_counter()
            out = model.generate(prompt, max_new_tokens=E2E_NEW_TOKENS, min_new_tokens=E2E_NEW_TOKENS,
                                 do_sample=False)
            assert out.shape[1] == E2E_PROMPT + E2E_NEW_TOKENS
            return E2E_NEW_TOKENS / (time.perf_counter() - t)

    def prefill(model) -> float:
        return best_time(lambda x: model(x), long, 3)

    row = {"load": os.getloadavg()[0]}
    for label, model, compiled in models:
        with contextlib.nullcontext() if compiled else compiled_kernels_off():
            for module in model.modules():
                module.__dict__.pop("_indices_cache", None)
            decode(model)  # warm-up
            row[label] = {"decode_tok_s": max(decode(model) for _ in range(3)), "prefill_s": prefill(model),
                          "bytes": held_bytes(model)}
        print(label, row[label], flush=True)
    results.put(key, row)


def measure_e2e(results: Results) -> None:
    """The dense model and the same model with dictionaries, on the compiled kernels and on torch's."""
    from factorkit.models import load

    key = f"e2e/{E2E_MODEL}"
    if key in results:
        return
    dense, _ = load(E2E_MODEL)
    dense.requires_grad_(False)
    sparse = dictionary_model(load(E2E_MODEL)[0])
    e2e_row([("dense", dense, True), ("dict-compiled", sparse, True), ("dict-torch", sparse, False)], results, key)


# (label, ratio of random low-rank factors or None for the dense model, quantization or None, compiled kernels on?)
E2E_QUANT = (("dense", None, None, True), ("dense int8", None, "int8", True),
             ("dense int8, torchao's path", None, "int8", False), ("dense int4", None, "int4", True),
             ("low rank 0.4", 0.4, None, True), ("low rank 0.4 + int8", 0.4, "int8", True),
             ("low rank 0.4 + int4", 0.4, "int4", True), ("dictionaries 0.2", "dict", None, True),
             ("dictionaries 0.2 + int8", "dict", "int8", True), ("dictionaries 0.2 + int4", "dict", "int4", True))


def measure_e2e_quant(results: Results) -> None:
    """Quantized models (factorkit.quantize on the dense model, on random low-rank factors at ratio 0.4 and on
    random dictionaries at 0.2), on factorkit's int8 kernel and on torchao's path."""
    import factorkit as fk
    from factorkit.models import load

    key = f"e2e-quant/{E2E_MODEL}"
    if key in results:
        return
    models = []
    for label, ratio, scheme, compiled in E2E_QUANT:
        model = load(E2E_MODEL)[0].requires_grad_(False)
        if ratio == "dict":
            model = dictionary_model(model)
        elif ratio is not None:
            model = lowrank_model(model, ratio)
        if scheme:
            fk.quantize(model, scheme, 32)
        models.append((label, model, compiled))
    e2e_row(models, results, key)


def measure_quant_dict(results: Results) -> None:
    """DictionaryLinear at ratio RATIO with its atoms and values quantized (int8 per row, int4 per 32 numbers):
    the mask kernel reading the int8 values and their scales, against nn.Linear and the float32 dictionary."""
    from factorkit.quantization import quantize_tensor

    if kernels.usable(kernels.dictionary()) == ():
        return
    for label, (out_f, in_f) in list(SHAPES.items())[:3]:  # the LLaMA-7B shapes: bound by reading weights
        if all(f"quant-dict/{label}/{t}" in results for t in QUANT_TOKENS):
            continue
        dense, _, dic = build(out_f, in_f, torch.float32)
        layers = {"dict": dic}
        for scheme in QUANT_SCHEMES:
            layer = copy.deepcopy(dic)
            for attr in type(layer).quantizable:
                setattr(layer, attr, nn.Parameter(quantize_tensor(getattr(layer, attr), scheme, 32)[0],
                                                  requires_grad=False))
            layers[f"dict+{scheme}"] = layer
        for tokens in QUANT_TOKENS:
            key = f"quant-dict/{label}/{tokens}"
            if key in results:
                continue
            x = torch.randn(1, tokens, in_f)
            row = {"dense": best_time(dense, x, 50), "load": os.getloadavg()[0],
                   "bytes": {"dense": stored_bytes(dense), **{k: held_bytes(m) for k, m in layers.items()}}}
            for name, layer in layers.items():
                row[name] = best_time(layer, x, 50)
            results.put(key, row)
            print(key, {k: f"{v * 1e6:.0f}us" for k, v in row.items() if isinstance(v, float) and k != "load"},
                  flush=True)


def busy(load: float | None) -> str:
    """A caption's note on a machine that was not quiet while the rows were measured."""
    return (f" The load average was {load:.1f} while these rows were measured (another process on the other core; "
            "each process on one thread)." if load and load > 0.5 else "")


def quant_table(results: Results, prefix: str, cells) -> tuple[list[list], list[dict]]:
    """(table rows: shape, tokens, nn.Linear time, then cells(row); the result rows) of the items under prefix."""
    rows, found = [], []
    for label in SHAPES:
        for tokens in QUANT_TOKENS:
            r = results.items.get(f"{prefix}/{label}/{tokens}")
            if r:
                found.append(r)
                rows.append([label, tokens, f"{r['dense'] * 1e6:.0f}", *cells(r)])
    return rows, found


def report(results: Results, name: str) -> None:
    sections = []
    for dname in DTYPES:
        rows = []
        for label in SHAPES:
            for tokens in TOKENS:
                r = results.items.get(f"{dname}/{label}/{tokens}")
                if not r:
                    continue
                speed = lambda key: f"{r['dense'] / r[key]:.2f}x" if key in r else "-"  # noqa: E731
                ideal = r["bytes"]["dense"] / r["bytes"]["dict"]
                rows.append([label, tokens, f"{r['dense'] * 1e6:.0f}", speed("lowrank"),
                             f"{r['bytes']['dense'] / r['bytes']['lowrank']:.2f}x"]
                            + [speed(f"dict-{k}") for k in KERNELS]
                            + [f"{speed('dict-auto')} ({r['auto-kernel']})", f"{ideal:.2f}x",
                               f"{r['dense'] / r['dict-auto'] / ideal:.2f}"])
        if rows:
            load = max((results.items.get(f"{dname}/{label}/{t}") or {}).get("load") or 0.0
                       for label in SHAPES for t in TOKENS)
            sections.append(f"**{dname}**{busy(load)}\n\n" + markdown_table(
                ["shape", "tokens", "nn.Linear (us)", "LowRankLinear", "its ideal", "dict mask", "dict lanes",
                 "dict sparse (CSR)", "dict codes (GEMM)", "dict auto (kernel)", "dict ideal", "auto / ideal"], rows))
    e2e = results.items.get(f"e2e/{E2E_MODEL}")
    if e2e:
        d = e2e["dense"]
        rows = [[label, f"{r['decode_tok_s']:.1f}", f"{r['decode_tok_s'] / d['decode_tok_s']:.2f}x",
                 f"{r['prefill_s'] * 1e3:.0f}", f"{d['prefill_s'] / r['prefill_s']:.2f}x",
                 f"{r['bytes'] / 2**20:.1f}", f"{r['bytes'] / d['bytes']:.2f}x"]
                for label, r in (("dense", d), ("dictionaries, compiled kernels", e2e["dict-compiled"]),
                                 ("dictionaries, torch kernels", e2e["dict-torch"]))]
        sections.append(f"""**End to end**: {E2E_MODEL} with every targeted linear a random DictionaryLinear at ratio
{RATIO} (speed does not depend on the values), greedy decode of {E2E_NEW_TOKENS} new tokens after a
{E2E_PROMPT}-token prompt (batch 1, best of 3), a {E2E_PREFILL}-token prefill (best of 3), and the bytes the model
holds in memory (parameters, buffers, and the int32 index copies the torch kernels build), float32.{busy(e2e.get("load"))}

""" + markdown_table(["model", "decode tok/s", "vs dense", "prefill 512 (ms)", "vs dense", "held MiB", "vs dense"],
                     rows))
    e2eq = results.items.get(f"e2e-quant/{E2E_MODEL}")
    if e2eq:
        d = e2eq["dense"]
        rows = [[label, f"{r['decode_tok_s']:.1f}", f"{r['decode_tok_s'] / d['decode_tok_s']:.2f}x",
                 f"{r['prefill_s'] * 1e3:.0f}", f"{d['prefill_s'] / r['prefill_s']:.2f}x",
                 f"{r['bytes'] / 2**20:.1f}", f"{r['bytes'] / d['bytes']:.2f}x"] for label, r in e2eq.items()
                if label != "load"]
        sections.append(f"""**End to end, quantized** (`factorkit.quantize`, int4 in groups of 32): {E2E_MODEL} dense, with
random low-rank factors at ratio 0.4 and with random dictionaries at ratio {RATIO}; the same decode, prefill and
held bytes as above (a quantized tensor counted as torchao holds it: int4 one number per byte), float32
activations; factorkit's int8 kernel runs up to 8 tokens (decode), torchao's path beyond (prefill).{busy(e2eq.get("load"))}

""" + markdown_table(["model", "decode tok/s", "vs dense", "prefill 512 (ms)", "vs dense", "held MiB", "vs dense"],
                     rows))
    rows, quant_rows = quant_table(results, "quant", lambda r: (
        [f"{r['dense'] / r[k]:.2f}x" for s in QUANT_SCHEMES for k in (s, f"{s}-torchao")]
        + [f"{r['bytes']['dense'] / r['bytes'][s]:.2f}x" for s in QUANT_SCHEMES]))
    if rows:
        sections.append("""**Quantized weights** (`factorkit.quantize`: int8 with a scale per row, int4 with a scale per 32
numbers, held one per byte by torchao), float32 activations: factorkit's compiled int8 kernel
(`QuantizedLinear`, up to 8 tokens) against torchao's own path (the whole weight converted to float, then a GEMM),
as speed against the float32 nn.Linear; ideal = float32 bytes / bytes the quantized weight holds in memory.""" + busy(
            max((r.get("load") or 0.0) for r in quant_rows)) + """

""" + markdown_table(["shape", "tokens", "nn.Linear (us)", "int8 kernel", "int8 torchao", "int4 kernel",
                      "int4 torchao", "int8 ideal", "int4 ideal"], rows))
    rows, dict_rows = quant_table(results, "quant-dict", lambda r: [
        f"{r['dense'] / r[k]:.2f}x ({r['bytes']['dense'] / r['bytes'][k]:.2f}x)"
        for k in ("dict", *(f"dict+{s}" for s in QUANT_SCHEMES))])
    if rows:
        sections.append(f"""**Quantized dictionaries**: DictionaryLinear at ratio {RATIO} with its atoms and values quantized
by `factorkit.quantize` (int8 per row, int4 per 32 numbers), float32 activations; the atoms through the int8
kernel, the code product through the mask kernel reading the int8 values and their scales. Speed against the
float32 nn.Linear, with the ideal (float32 bytes / bytes held) in brackets.""" + busy(
            max((r.get("load") or 0.0) for r in dict_rows)) + """

""" + markdown_table(["shape", "tokens", "nn.Linear (us)", "dict float32", "dict + int8", "dict + int4"], rows))
    isa = "avx512" if name == "kernels" else name.removeprefix("kernels-")
    path = "not built (torch kernels only)" if isa == "torch" else f"built, {isa} path"
    title = "" if isa == "avx512" else f" ({isa} build)"
    body = f"""## Layer kernels against nn.Linear{title}

`python benchmarks/bench_kernels.py` ({results.measured()}; {results.machine()}; compiled kernels: {path}). Random
factors at ratio {RATIO} (DictionaryLinear: k atoms and s = k/2 nonzeros per row by the paper's count;
LowRankLinear: the rank of the same parameter count), best wall time over repeated calls, side by side in one
process. Each entry is the speed against nn.Linear (above 1x: faster); *ideal* is dense bytes / stored bytes
(parameters and the support mask), what a kernel bound by reading its weights reaches. `mask` and `lanes` are
the compiled kernels of `factorkit.kernels` (the code product read from the bit mask; `lanes` puts 16 tokens
in each vector with AVX-512, 8 with AVX2); `sparse` is torch's CSR product over int32 indices (what decoding ran before the compiled
kernels); `codes` writes the code matrix from the mask and runs a second GEMM. `-`: not timed at that size
(far slower there). The SmolLM2 layers fit in the caches when one layer is called over and over, so their rows
measure compute, not the reads that bound a whole model: the end-to-end table shows the latter.

{(chr(10) * 2).join(sections)}
"""
    write_section(name, body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--report", action="store_true", help="only rewrite BENCHMARKS.md")
    ap.add_argument("--fresh", action="store_true", help="ignore results of an earlier run")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated tables to measure: {', '.join(PARTS)}")
    args = ap.parse_args()
    parts = args.parts.split(",")
    if unknown := [p for p in parts if p not in PARTS]:
        ap.error(f"--parts {','.join(unknown)} is unknown; choose from {', '.join(PARTS)}")
    name = build_name(kernels.dictionary())
    results = Results(name, {"ratio": RATIO, "threads": torch.get_num_threads()}, fresh=args.fresh)
    if not args.report:
        for part, run in zip(PARTS, (measure, measure_e2e, measure_quant, measure_quant_dict, measure_e2e_quant)):
            if part in parts:
                run(results)
    report(results, name)


if __name__ == "__main__":
    main()
