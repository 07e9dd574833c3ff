"""How fast a model runs and how much memory it takes: greedy decode throughput, prefill time and peak
resident memory of several models measured one after the other in one process, against the first.

Decode: ``generate`` greedy from a 16-token random prompt, exactly ``new_tokens`` new tokens per sequence,
best of ``repeats`` after one warm-up; tokens/s counts the new tokens of every sequence of the batch.
Prefill: one forward pass over ``length`` random tokens with a fresh KV cache, asking for the logits of the
last position only where the model allows it (as a server does), best of ``repeats``.
Memory: each model is loaded after the previous one is freed (and, on glibc, its freed pages returned to the
system); *held* is the bytes its parameters and buffers take (quantized tensors as torchao holds them, the
index caches the torch kernels build included), *peak* the largest resident set size of the process, sampled
every millisecond from ``/proc/self/statm`` while the model decodes the largest batch and prefills the longest
prompt, minus the resident size before the model was loaded: weights, KV cache, activations and whatever the
kernels allocate. Timing runs without the sampler. Linux only for the peak (elsewhere it is left out).
"""

from __future__ import annotations

import inspect
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from ..factors.base import is_quantized
from .memory import release_memory, resident_bytes

PROMPT_TOKENS = 16


@dataclass
class SpeedRow:
    label: str
    decode_tok_s: dict[int, float]  # batch size -> new tokens per second (all sequences)
    prefill_s: dict[int, float]  # prompt length -> seconds
    held_bytes: int
    peak_bytes: int | None  # resident bytes above the process before loading (None: not measurable here)
    seconds: float = 0.0  # wall time of this row's measurements (loading included)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class SpeedResult:
    rows: list[SpeedRow]
    new_tokens: int
    batch_sizes: tuple[int, ...]
    prefill: tuple[int, ...]
    repeats: int
    threads: int = field(default_factory=torch.get_num_threads)

    def as_dict(self) -> dict:
        return {"rows": [r.as_dict() for r in self.rows], "new_tokens": self.new_tokens,
                "batch_sizes": list(self.batch_sizes), "prefill": list(self.prefill), "repeats": self.repeats,
                "threads": self.threads}

    def table(self, title: str) -> tuple:
        """(title, header, rows, caption) for ``report.print_table``; ratios against the first row (above 1x:
        faster, or smaller for memory, than it)."""
        ref = self.rows[0]
        header = (["model"] + [f"decode b{b} tok/s" for b in self.batch_sizes]
                  + [f"prefill {n} ms" for n in self.prefill] + ["held MiB", "peak MiB"])
        rows = []
        for r in self.rows:
            cells = [r.label]
            cells += [_cell(r.decode_tok_s[b], r.decode_tok_s[b] / ref.decode_tok_s[b], "{:.1f}")
                      for b in self.batch_sizes]
            cells += [_cell(r.prefill_s[n] * 1e3, ref.prefill_s[n] / r.prefill_s[n], "{:.0f}") for n in self.prefill]
            cells.append(_cell(r.held_bytes / 2**20, ref.held_bytes / r.held_bytes, "{:.1f}"))
            cells.append("-" if r.peak_bytes is None or not ref.peak_bytes else
                         _cell(r.peak_bytes / 2**20, ref.peak_bytes / r.peak_bytes, "{:.1f}"))
            rows.append(cells)
        caption = (f"Greedy decode of {self.new_tokens} new tokens after a {PROMPT_TOKENS}-token prompt (tokens/s over "
                   f"all sequences of the batch), prefill of one prompt; best of {self.repeats}, {self.threads} "
                   f"thread(s). In brackets: against {ref.label} (above 1x: faster, or fewer bytes). Held: parameters "
                   "and buffers; peak: resident memory while decoding the largest batch and prefilling the longest "
                   "prompt, above the process before loading.")
        return title, header, rows, caption


def _cell(value: float, ratio: float, fmt: str) -> str:
    return f"{fmt.format(value)} ({ratio:.2f}x)"


def held_bytes(model: nn.Module) -> int:
    """Bytes the model's parameters and buffers hold in memory (each storage once; quantized tensors as torchao
    holds them) and the int32 index copies the torch kernels of DictionaryLinear cache."""
    from ..quantization import tensor_bytes

    total = sum(tensor_bytes(t, packed=False) for t in [*model.parameters(), *model.buffers()])  # each once
    for module in model.modules():
        cached = module.__dict__.get("_indices_cache")
        total += 0 if cached is None else cached[1].numel() * cached[1].element_size()
    return total


class PeakResident:
    """Context manager sampling the resident set size every ``interval`` seconds in a thread; ``peak`` is the
    largest seen (None where it cannot be read)."""

    def __init__(self, interval: float = 0.001):
        self.interval, self.peak = interval, resident_bytes()
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            now = resident_bytes()
            self.peak = max(self.peak, now)

    def __enter__(self) -> "PeakResident":
        if self.peak is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.peak is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, resident_bytes())


def _prefill_kwargs(model: nn.Module) -> dict:
    """Ask for the last position's logits only, where the model's forward takes logits_to_keep."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def _decode(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> float:
    pad = getattr(model.generation_config, "pad_token_id", None)
    pad = pad if pad is not None else getattr(model.generation_config, "eos_token_id", None)
    if isinstance(pad, (list, tuple)):
        pad = pad[0]
    with torch.inference_mode():
        t = time.perf_counter()
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
        seconds = time.perf_counter() - t
    assert out.shape[1] == prompt.shape[1] + new_tokens
    return prompt.shape[0] * new_tokens / seconds


def _prefill(model: nn.Module, ids: torch.Tensor) -> float:
    kwargs = _prefill_kwargs(model)
    with torch.inference_mode():
        t = time.perf_counter()
        model(ids, **kwargs)
        return time.perf_counter() - t


def measure(model: nn.Module, label: str, *, new_tokens: int = 64, batch_sizes: Iterable[int] = (1, 8),
            prefill: Iterable[int] = (512, 2048), repeats: int = 3, seed: int = 0,
            baseline: int | None = None) -> SpeedRow:
    """One model's row. ``baseline``: the resident bytes before it was loaded (default: now)."""
    start = time.perf_counter()
    baseline = resident_bytes() if baseline is None else baseline
    batch_sizes, prefill = tuple(batch_sizes), tuple(prefill)
    vocab = model.get_input_embeddings().num_embeddings
    gen = torch.Generator().manual_seed(seed)
    prompts = {b: torch.randint(vocab, (b, PROMPT_TOKENS), generator=gen) for b in batch_sizes}
    long = {n: torch.randint(vocab, (1, n), generator=gen) for n in prefill}
    with PeakResident() as peak:  # first calls (they also warm up): the memory they take
        _decode(model, prompts[max(batch_sizes)], new_tokens)
        _prefill(model, long[max(prefill)])
    decode = {b: max(_decode(model, prompts[b], new_tokens) for _ in range(repeats)) for b in batch_sizes}
    for n in prefill:
        _prefill(model, long[n])  # warm-up at this length
    times = {n: min(_prefill(model, long[n]) for _ in range(repeats)) for n in prefill}
    peak_bytes = None if peak.peak is None or baseline is None else max(0, peak.peak - baseline)
    return SpeedRow(label, decode, times, held_bytes(model), peak_bytes, time.perf_counter() - start)


def own_memory(model: nn.Module) -> None:
    """Copy every plain parameter and buffer of ``model`` into memory of its own. Models load from memory-mapped
    safetensors files; one built from such a file (quantized, or its Linears replaced by factors) keeps the
    whole mapping alive through the tensors it did not replace, and with it the resident pages of the weights
    it read and dropped: its peak would count the file, not the model."""
    with torch.no_grad():  # parameters() and buffers() give each tensor once, tied ones included
        for tensor in [*model.parameters(), *model.buffers()]:
            if not is_quantized(tensor):
                tensor.data = tensor.data.clone()


def compare(loaders: Iterable[tuple[str, Callable[[], nn.Module]]], *, progress: Callable[[str], None] | None = None,
            **settings) -> list[SpeedRow]:
    """Each (label, loader) measured in turn in this process: loaded after the previous model is freed, so its
    peak counts its own memory. ``settings``: as for ``measure``."""
    rows = []
    for label, loader in loaders:
        release_memory()
        baseline = resident_bytes()
        model = loader()
        model.requires_grad_(False)
        own_memory(model)
        release_memory()  # what loading or quantizing freed (a float copy of the weights) is not counted
        rows.append(measure(model, label, baseline=baseline, **settings))
        if progress is not None:
            progress(label)
        del model
    release_memory()
    return rows
