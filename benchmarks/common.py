"""Shared helpers for the benchmark scripts: machine description, resumable
result files, one sweep point through factorkit.run, latency timing, and
rewriting one marked section of BENCHMARKS.md."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime as _dt
import json
import os
import platform
import re
import tempfile
from pathlib import Path

import torch

import factorkit as fk
from factorkit import kernels
from factorkit.data import eval_tokens

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"


@contextlib.contextmanager
def compiled_kernels_off():
    """factorkit's compiled kernels switched off (read at every call): the torch / torchao paths run."""
    before = os.environ.get(kernels.DISABLE_ENV)
    os.environ[kernels.DISABLE_ENV] = "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ[kernels.DISABLE_ENV]
        else:
            os.environ[kernels.DISABLE_ENV] = before


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    threads = torch.get_num_threads()
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{threads} thread{'' if threads == 1 else 's'}, Python {platform.python_version()}")


def cpu_name() -> str:
    return machine().split(", ")[0]


def _with_cpu(text: str, cpu: str) -> str:
    """A ``machine()`` text with its processor named ``cpu`` instead."""
    head, sep, rest = text.partition(" cores, ")
    return f"{cpu}, {head.rsplit(', ', 1)[-1]}{sep}{rest}" if sep else text


# Results stored before items carried their processor were all measured on the 2-core AMD EPYC machines that
# their reports named; from 2026-12-04 each item records its own (the machines lent differ from day to day).
UNRECORDED_CPU = "AMD EPYC"


def today() -> str:
    return _dt.date.today().isoformat()


# Result files written before items carried their dates, and the day BENCHMARKS.md said they were measured:
# a file's modification time is the day of the checkout, not of the measurement.
UNDATED = {name: "2026-11-24" for name in ("lowrank", "cospadi", "cospadi-cuda", "dsformer", "dsformer-cuda")}


class Results:
    """Results of a long benchmark, written after every finished item so an
    interrupted run resumes where it stopped (same settings only)."""

    def __init__(self, name: str, settings: dict, fresh: bool = False) -> None:
        RESULTS.mkdir(parents=True, exist_ok=True)
        self.path = RESULTS / f"{name}.json"
        self.settings = settings
        if fresh and self.path.exists():  # kept beside, out of the way of put's merging
            os.replace(self.path, self.path.with_suffix(".json.old"))
        data = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.items: dict = data.get("items", {}) if data.get("settings") == settings else {}
        # the day each item was measured; items stored before dates were kept count as measured on the day
        # BENCHMARKS.md gave them (UNDATED), else on the day the file was last written
        undated = (UNDATED.get(name) or _dt.date.fromtimestamp(self.path.stat().st_mtime).isoformat()
                   if self.items else today())
        dates = data.get("dates", {}) if self.items else {}
        self.dates: dict = {key: dates.get(key, undated) for key in self.items}
        cpus = data.get("cpus", {}) if self.items else {}
        self.cpus: dict = {key: cpus.get(key, UNRECORDED_CPU) for key in self.items}

    def __contains__(self, key: str) -> bool:
        return key in self.items

    def __getitem__(self, key: str) -> dict:
        return self.items[key]

    def put(self, key: str, value: dict) -> None:
        # keep what another run of the same settings stored meanwhile (two ratios or methods run side by side)
        data = json.loads(self.path.read_text()) if self.path.exists() else {}
        if data.get("settings") == self.settings:
            for other, item in data.get("items", {}).items():
                if other not in self.items:
                    self.items[other] = item
                    self.dates[other] = data.get("dates", {}).get(other, today())
                    self.cpus[other] = data.get("cpus", {}).get(other, UNRECORDED_CPU)
        self.items[key] = value
        self.dates[key] = today()
        self.cpus[key] = cpu_name()
        tmp = self.path.with_suffix(f".json.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"settings": self.settings, "items": self.items, "dates": self.dates,
                                   "cpus": self.cpus}, indent=2))
        os.replace(tmp, self.path)

    def measured(self) -> str:
        """The day (or first and last day) the stored items were measured, for the report's header; a report
        rewritten later from stored results keeps the dates of the measurements."""
        return _days(self.dates.values())

    def machine(self, text: str | None = None) -> str:
        """``text`` (a ``machine()`` text stored when measured; default: this machine's) naming the processor(s)
        the stored items were measured on, with the days of each where there are several: a report rewritten
        later, or on another machine, keeps where its figures come from."""
        by_cpu: dict[str, list[str]] = {}
        for key, cpu in self.cpus.items():
            if key != "machine":  # the record of the last run's settings, not a measurement
                by_cpu.setdefault(cpu, []).append(self.dates[key])
        text = text or machine()
        if len(by_cpu) < 2:
            return _with_cpu(text, next(iter(by_cpu), cpu_name()))
        return _with_cpu(text, " and ".join(f"{cpu} ({_days(days)})" for cpu, days in
                                            sorted(by_cpu.items(), key=lambda item: min(item[1]))))


def _days(dates) -> str:
    days = sorted(set(dates)) or [today()]
    return days[0] if len(days) == 1 else f"{days[0]} to {days[-1]}"


# Calibration and held-out text of the method benchmarks: the general corpus by default, as users calibrate;
# the plays are the second, domain-specific setting. (calibration, held-out) as the reports name them.
CALIB_TEXT = {"general": ("the calibration split of the built-in `general` corpus", "the held-out split of `general`"),
              "shakespeare": ("the calibration plays", "the held-out plays")}


def add_calib_argument(ap) -> None:
    ap.add_argument("--calib", choices=tuple(CALIB_TEXT), default="general",
                    help="calibration text, and the held-out text of the same corpus (default: general; "
                         "shakespeare: the plays)")


def calib_name(stem: str, calib: str) -> str:
    """The results file and BENCHMARKS.md section of one calibration; the plays keep the names their results were
    first written under."""
    return stem if calib == "shakespeare" else f"{stem}-{calib}"


def run_point(base, tok, job: fk.CompressJob, config: fk.CompressionConfig):
    """One sweep point: ``job`` with ``config`` run by factorkit.run on a copy of ``base`` (compressed in place).
    Returns the compressed copy and the CompressJobReport."""
    model = copy.deepcopy(base)
    return model, fk.run(dataclasses.replace(job, method=config), model=(model, tok))


def held_out(model, tok, job: fk.CompressJob):
    """The EvalReport of ``model`` on ``job``'s evaluation text, measured as factorkit.run measures a compression."""
    return fk.run(fk.EvalJob(model=job.model, text=job.eval, seed=job.seed, seq_len=job.seq_len,
                             max_chunks=job.max_chunks, dtype=job.dtype), model=(model, tok))


def reload_max_abs_diff(model, tok, job: fk.CompressJob) -> float:
    """Largest logit difference, on 256 tokens of ``job``'s evaluation text, between ``model`` and the model
    factorkit.save wrote and factorkit.load read back."""
    x = eval_tokens(tok, job.eval, job.seq_len, job.max_chunks, job.seed)[:1, :256]
    with tempfile.TemporaryDirectory() as tmp:
        fk.save(model, Path(tmp) / "m")
        again = fk.load(Path(tmp) / "m")
        with torch.no_grad():
            return float((again(x).logits - model(x).logits).abs().max())


def with_train(cls, settings: dict):
    """``cls`` (PretrainConfig, FinetuneConfig) from one flat dict of settings, the form the stored results are
    keyed by: the TrainConfig fields among them go to ``train``, over ``cls``'s own training defaults."""
    names = {f.name for f in dataclasses.fields(fk.TrainConfig)}
    train = dataclasses.replace(cls().train, **{k: v for k, v in settings.items() if k in names})
    return cls(**{k: v for k, v in settings.items() if k not in names}, train=train)


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
