"""Shared helpers for the benchmark scripts: machine description, resumable
result files, and rewriting one marked section of BENCHMARKS.md."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, Python {platform.python_version()}")


def today() -> str:
    return _dt.date.today().isoformat()


class Results:
    """Results of a long benchmark, written after every finished item so an
    interrupted run resumes where it stopped (same settings only)."""

    def __init__(self, name: str, settings: dict, fresh: bool = False) -> None:
        RESULTS.mkdir(parents=True, exist_ok=True)
        self.path = RESULTS / f"{name}.json"
        self.settings = settings
        data = json.loads(self.path.read_text()) if self.path.exists() and not fresh else {}
        self.items: dict = data.get("items", {}) if data.get("settings") == settings else {}
        # the day each item was measured; items stored before dates were kept count as measured on the day
        # the file was last written
        undated = _dt.date.fromtimestamp(self.path.stat().st_mtime).isoformat() if self.items else today()
        dates = data.get("dates", {}) if self.items else {}
        self.dates: dict = {key: dates.get(key, undated) for key in self.items}

    def __contains__(self, key: str) -> bool:
        return key in self.items

    def __getitem__(self, key: str) -> dict:
        return self.items[key]

    def put(self, key: str, value: dict) -> None:
        self.items[key] = value
        self.dates[key] = today()
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"settings": self.settings, "items": self.items, "dates": self.dates}, indent=2))
        os.replace(tmp, self.path)

    def measured(self) -> str:
        """The day (or first and last day) the stored items were measured, for the report's header; a report
        rewritten later from stored results keeps the dates of the measurements."""
        days = sorted(set(self.dates.values())) or [today()]
        return days[0] if len(days) == 1 else f"{days[0]} to {days[-1]}"


def best_time(fn, x, repeats: int) -> float:
    """Best wall time of ``fn(x)`` over ``repeats`` calls after 3 warm-ups (synchronised on a GPU)."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    with torch.inference_mode():
        for _ in range(3):
            fn(x)
        best = float("inf")
        for _ in range(repeats):
            sync()
            t = time.perf_counter()
            fn(x)
            sync()
            best = min(best, time.perf_counter() - t)
    return best


def time_kernels(dense, lowrank, module, kernels, x, prefix: str = "") -> dict:
    """One latency row: nn.Linear, LowRankLinear, and ``module`` with each of its
    ``kernels`` forced and then on "auto" (keys ``prefix + kernel``)."""
    repeats = 200 if x.shape[-2] == 1 else 30
    row = {"dense": best_time(dense, x, repeats), "lowrank": best_time(lowrank, x, repeats)}
    for kernel in list(kernels) + ["auto"]:
        module.kernel = kernel
        row[prefix + kernel] = best_time(module, x, repeats)
    return row


def write_section(name: str, body: str) -> None:
    """Replace the section between <!-- name:start --> and <!-- name:end --> in BENCHMARKS.md."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.strip()}\n{end}"
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else "# Benchmarks\n\nEvery number here is written by `make bench`.\n"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    tmp = BENCHMARKS_MD.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, BENCHMARKS_MD)
