"""The ``factorkit`` command, generated from the configs' fields.

    factorkit compress --model smollm2-135m --method svdllm --ratio 0.2 --calib shakespeare --out out/svdllm
    factorkit eval --model out/svdllm --text shakespeare
    factorkit quantize --model out/svdllm --quantize int4 --eval general --out out/svdllm-int4
    factorkit eval --model out/svdllm --tasks all --limit 100      (lm-eval's zero-shot suite; writes a JSON file)
    factorkit finetune --model smollm2-135m --adapter wara --r 8 --text my_notes.txt --out out/wara
    factorkit pretrain --config llama-20m --param sltrain --rank 64 --delta 0.03 --steps 300 --out out/sltrain
    torchrun --nproc-per-node 2 -m factorkit.cli pretrain ...   (data parallel, same loss curve)

Every option is a config field (``factorkit.config.option``): help, checks and name live there once. An
option the chosen method or setting does not use is refused, never dropped. Errors a user can cause end
in one sentence on stderr and exit status 2, with nothing written.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import sys
import time
import typing
from pathlib import Path
from typing import Any, Sequence

from . import api
from .config import Above, Config, ConfigError, config_type, is_tuple
from .errors import FactorkitError, PeerFailed
from .methods import DEFAULT_METHOD, METHODS
from .models.files import atomic_file, check_writable_file
from .report import print_table


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and one prefix, like every other user error
        self.exit(2, f"factorkit: error: {message.rstrip('.')}; see {self.prog} --help.\n")


def _converter(tp: Any):
    """A string -> value function for a field's type (argparse reports a bad value)."""
    args = [t for t in (typing.get_args(tp) or (tp,)) if t is not type(None)]
    if is_tuple(tp):  # comma separated; the items converted like a single value of their type
        items = next((typing.get_args(t) for t in (tp, *args) if typing.get_origin(t) is tuple), ())
        one = _converter(items[0]) if items and items[0] is not str else str
        return lambda text: tuple(one(t.strip()) for t in text.split(",") if t.strip())
    kind = {(int,): (int, "a whole number"), (float,): (float, "a number")}.get(tuple(args))
    if kind is None:
        return str

    def convert(text: str):
        try:
            return kind[0](text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {kind[1]}") from None
    return convert


def _leaves(cls: type[Config], prefix: str = "", path: tuple[str, ...] = ()):
    """(flag, path of field names, field, owner class) of every command-line option of ``cls``."""
    hints = typing.get_type_hints(cls)
    for f in cls.options():
        sub = config_type(hints[f.name])
        if sub is not None:
            hidden = {path + (f.name, name) for name in f.metadata.get("hide", ())}
            yield from (leaf for leaf in _leaves(sub, prefix + f.metadata.get("prefix", ""), path + (f.name,))
                        if leaf[1] not in hidden)
        else:
            yield "--" + prefix + (f.metadata.get("flag") or f.name.replace("_", "-")), path + (f.name,), f, cls


def _add_options(parser: argparse.ArgumentParser, cls: type[Config], root: tuple = (), seen: dict | None = None
                 ) -> dict:
    """Add ``cls``'s options (once each, help with the default); returns {flag: dest path}."""
    seen, defaults = {} if seen is None else seen, cls()
    for flag, path, f, owner in _leaves(cls):
        value = defaults
        for name in path:
            value = getattr(value, name)
        if flag in seen:
            continue
        seen[flag] = root + path
        kind = typing.get_type_hints(owner)[f.name]
        help_text = f"{f.metadata['help']} (default {value if value is not None else 'none'})".replace("%", "%%")
        common = dict(dest=".".join(root + path), default=argparse.SUPPRESS, help=help_text)
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
        else:
            parser.add_argument(flag, type=_converter(kind), choices=f.metadata.get("choices"), **common)
    return seen


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="factorkit", description="Compress transformer models by rewriting their weight matrices "
                                                   "as structured factorizations.",
                     epilog="Start with: factorkit compress --out out/demo --eval shakespeare")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--json", metavar="FILE", help="also write the report as JSON to FILE (eval --tasks always "
                                                       "writes one: to a new file under factorkit-results/ without it)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    methods = "\n".join(f"  {m.name:8s} {m.summary}" for m in METHODS.values())
    c = sub.add_parser("compress", help="compress a model and save it", formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Replace every Linear layer inside the transformer blocks by a factorization that "
                                   "removes --ratio of its parameters, calibrated on --calib, and save it to --out.",
                       epilog=f"methods:\n{methods}")
    c.add_argument("--method", choices=sorted(METHODS), default=DEFAULT_METHOD, help=f"default {DEFAULT_METHOD}")
    seen = _add_options(c, api.CompressJob)
    for name, method in METHODS.items():  # an option several methods share is listed under the first
        _add_options(c.add_argument_group(f"--method {name}"), method.config_cls, ("method",), seen)
    c.set_defaults(job=api.CompressJob)
    for name, job in (("quantize", api.QuantizeJob), ("eval", api.EvalJob), ("bench-speed", api.SpeedJob),
                      ("pretrain", api.PretrainJob), ("finetune", api.FinetuneJob)):
        text = " ".join(job.__doc__.split()).replace("``", "")
        p = sub.add_parser(name, help=text.split(" (")[0].rstrip("."), description=text)
        _add_options(p, job)
        p.set_defaults(job=job)
    return parser


def _build(cls: type[Config], given: dict[tuple, Any], flags: dict[tuple, str], path: tuple = (),
           base: Config | None = None) -> Config:
    """``cls`` from its defaults (``base``) and the options given (by dest path); refuses an option that
    only applies with another setting, and re-raises a ConfigError naming the flag."""
    base = base if base is not None else cls()
    hints, fields = typing.get_type_hints(cls), {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for name in fields:
        here = path + (name,)
        if config_type(hints[name]) is not None and any(k[:len(here)] == here for k in given):
            kwargs[name] = _build(config_type(hints[name]), given, flags, here, getattr(base, name))
        elif here in given:
            kwargs[name] = given[here]
    for name in kwargs:
        when = fields[name].metadata.get("when")
        wanted = when and (when[1] if isinstance(when[1], (tuple, Above)) else (when[1],))
        if when and kwargs.get(when[0], getattr(base, when[0])) not in wanted:
            here = path + (name,)  # a nested config names the first of its options given
            flag = flags.get(here) or next(flags[k] for k in given if k[:len(here)] == here)
            need = str(wanted) if isinstance(wanted, Above) else " or ".join(map(str, wanted))
            raise FactorkitError(f"{flag} applies only with {flags[path + (when[0],)]} {need}; drop it or "
                                 "change that setting.")
    try:
        return dataclasses.replace(base, **kwargs)
    except ConfigError as err:
        raise FactorkitError(f"{flags.get(path + (err.name,), err.name)} {err.problem}") from None


def _flags(cls: type[Config], root: tuple = ()) -> dict[tuple, str]:
    return {root + path: flag + (f"/--no-{flag[2:]}" if f.type in (bool, "bool") else "")
            for flag, path, f, _ in _leaves(cls)}


def make_job(args: argparse.Namespace) -> Config:
    """The job the parsed options describe; options that do not apply are refused."""
    given = {tuple(k.split(".")): v for k, v in vars(args).items() if "." in k or k not in
             ("quiet", "json", "command", "job", "method")}
    if args.job is not api.CompressJob:
        return _build(args.job, given, _flags(args.job))
    flags, users = _flags(api.CompressJob), {}
    for m in METHODS.values():
        for key, flag in _flags(m.config_cls, ("method",)).items():
            users.setdefault((key, flag), []).append(m.name)
    flags.update(_flags(METHODS[args.method].config_cls, ("method",)))
    for (key, flag), names in users.items():
        if key in given and key not in flags:
            raise FactorkitError(f"{flag} applies to --method {' or '.join(names)} only, not {args.method}.")
    method = _build(METHODS[args.method].config_cls, {k[1:]: v for k, v in given.items() if k[0] == "method"},
                    {k[1:]: v for k, v in flags.items() if k[0] == "method"})
    unused = [flags[k] for k in given if k in (("calib",), ("calib_samples",), ("calib_seq_len",))]
    if unused and not method.wants_data():
        raise FactorkitError(f"{unused[0]} applies only to a method that calibrates, and {args.method} with these "
                             "settings uses no data; drop it.")
    return _build(api.CompressJob, {k: v for k, v in given.items() if k[0] != "method"}, flags,
                  base=api.CompressJob(method=method))


def default_json(job: api.EvalJob) -> Path:
    """Where a zero-shot evaluation writes its results without --json: a new file under
    factorkit-results/, named after the model and the time (never an existing file)."""
    model = Path(job.model).resolve().name if Path(job.model).exists() else Path(job.model).name
    stem = f"eval-{re.sub(r'[^A-Za-z0-9._-]+', '-', model).strip('-.') or 'model'}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = Path("factorkit-results") / f"{stem}.json", 1
    while path.exists():
        n += 1
        path = path.with_name(f"{stem}-{n}.json")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.quiet:
        __import__("transformers").utils.logging.disable_progress_bar()
    job = None
    try:
        job = make_job(args)
        if getattr(job, "out", "") is None:
            raise FactorkitError(f"{args.command} writes a model; name the folder with --out.")
        report_file = args.json
        if report_file is None and isinstance(job, api.EvalJob) and job.tasks:
            report_file = default_json(job)  # zero-shot results are always kept
        if report_file:
            check_writable_file(report_file, "--json")  # before any work, like --out
        report = api.run(job, progress=not args.quiet)
        if getattr(report, "saved", True) is False and job.out is not None or getattr(report, "rank", 0) != 0:
            return 0  # another process of a torchrun job wrote and reports
        for table in report.tables() if hasattr(report, "tables") else [report.table()]:
            print_table(*table)
        if report_file:
            with atomic_file(report_file) as tmp:
                tmp.write_text(json.dumps(report.as_dict(), indent=2, default=str))
            if not args.json:
                print(f"Results written to {report_file}.")
    except FactorkitError as exc:
        print(f"factorkit: error: {exc}", file=sys.stderr)
        return 2
    except PeerFailed as exc:  # the failing process of a torchrun job prints its own traceback
        print(f"factorkit: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        resume = api.resume_folder(job) if job is not None else None
        print("factorkit: interrupted; " + (f"rerun the same command to resume from the last checkpoint in {resume}."
                                            if resume else "nothing was written."), file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
