"""Bad input and faults over every command (compress, eval, pretrain, finetune through
``factorkit.cli.main``) and the Python API.

Each case is a specification of one refusal: the exit status (2 for a user error,
SystemExit(2) for a usage error argparse finds), exactly one stderr line
``factorkit: error: <one sentence>`` that names the problem, no traceback, and
nothing written or deleted: neither --out nor anything else appears, and every
input (model folders, texts, checkpoint folders) keeps its files byte for byte.

Inputs live in one module-wide folder (``world``: a tiny LLaMA folder, damaged
copies of it, texts, configs); placeholders in the tables: ``@name`` is
``world/name``, ``OUT`` is the test's output folder, ``TMP/name`` a path in the
test's own folder.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import factorkit as fk
from factorkit.cli import main
from factorkit.data import calibration_tokens, eval_tokens
from factorkit.errors import FactorkitError, NonFiniteLossError
from factorkit.eval import perplexity
from factorkit.factors import factor_modules
from factorkit.workflows.finetune import FinetuneConfig
from factorkit.workflows.pretrain import PretrainConfig

from conftest import SAMPLE_TEXT, tiny_llama

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 64}
INF_WEIGHT = "model.layers.1.mlp.up_proj"


class _Payload:
    """What a crafted pickle does: run code while it is loaded (here: create a marker file)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer) -> Path:
    """Every input the cases read; no case may change it."""
    root = tmp_path_factory.mktemp("world")

    def model_folder(name, model=None, tok=tokenizer):
        (model or tiny_llama()).save_pretrained(root / name)
        if tok is not None:
            tok.save_pretrained(root / name)
        return root / name

    model_folder("model")
    model_folder("notok", tok=None)
    (model_folder("nocfg") / "config.json").unlink()
    (model_folder("badcfg") / "config.json").write_text('{"model_type": ')
    (model_folder("badtok") / "tokenizer.json").write_text("{nope")
    missing = model_folder("missing-weight")
    state = load_file(str(missing / "model.safetensors"))
    state.pop("model.layers.0.mlp.up_proj.weight")
    save_file(state, str(missing / "model.safetensors"), metadata={"format": "pt"})
    pickled = model_folder("pickled")  # weights only as a pickle that runs code when loaded
    (pickled / "model.safetensors").unlink()
    torch.save({"evil": _Payload(root / "marker")}, pickled / "pytorch_model.bin")
    inf = tiny_llama()
    with torch.no_grad():
        inf.get_submodule(INF_WEIGHT).weight[0, 0] = math.inf
    model_folder("inf-model", inf)
    model_folder("small-vocab", tiny_llama(vocab=100))  # its 200-token tokenizer does not fit
    (root / "garbage.gguf").write_bytes(b"GGUF\x03\x00\x00\x00garbage" * 10)
    (root / "empty.gguf").write_bytes(b"")
    (root / "plays.txt").write_text(SAMPLE_TEXT)
    (root / "short.txt").write_text("Fair is foul.")
    (root / "empty.txt").write_text("")
    (root / "latin1.txt").write_bytes("Fair is foul, caf\xe9.\n".encode("latin-1") * 50)
    (root / "afile").write_text("not a folder")
    (root / "other").mkdir()
    (root / "other" / "mine.txt").write_text("keep")
    (root / "tiny.json").write_text(json.dumps(TINY))
    (root / "cfg-list.json").write_text("[32, 2]")
    (root / "cfg-heads.json").write_text(json.dumps({**TINY, "hidden_size": 30}))
    (root / "cfg-zero-layers.json").write_text(json.dumps({**TINY, "num_hidden_layers": 0}))
    (root / "pickled-ck").mkdir()
    torch.save({"step": 1, "evil": _Payload(root / "marker")}, root / "pickled-ck" / "train_state.pt")
    return root


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("FACTORKIT_CACHE", str(tmp_path_factory.getbasetemp() / "fk-cache"))  # trained BPEs


def snapshot(*folders: Path) -> dict[str, str]:
    """Every path under the folders (folders too, hidden ones too) with a hash of each file's bytes."""
    return {str(p): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder")
            for folder in folders for p in sorted(folder.rglob("*"))}


def expand(arg, world: Path, tmp: Path) -> str:
    arg = str(arg)
    if arg.startswith("@"):
        return str(world / arg[1:])
    if arg == "OUT":
        return str(tmp / "out")
    return str(tmp / arg[4:]) if arg.startswith("TMP/") else arg


def one_sentence(message: str) -> bool:
    return message.endswith(".") and "\n" not in message and not re.search(r"[.!?] [A-Z]", message)


def check_failure(capsys, world: Path, tmp: Path, argv, phrase: str, usage: bool = False) -> str:
    """Run ``factorkit -q ARGV``; assert the status, the one error sentence naming ``phrase``, and that
    nothing was written or deleted. Returns the message."""
    argv = ["-q", *(expand(a, world, tmp) for a in argv)]
    before = snapshot(world, tmp)
    capsys.readouterr()  # drop what fixtures printed
    if usage:  # argparse: SystemExit(2), like every usage error
        with pytest.raises(SystemExit) as exc:
            main(argv)
        status = exc.value.code
    else:
        status = main(argv)
    out, err = capsys.readouterr()
    assert status == 2, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("factorkit: error: "), err
    message = errors[0].removeprefix("factorkit: error: ")
    assert one_sentence(message), message
    assert phrase in message, message
    assert "Saved to" not in out
    assert snapshot(world, tmp) == before  # nothing written, nothing deleted, inputs untouched
    assert not (world / "marker").exists()  # nothing unpickled
    return message


# ------------------------------------------------------------------------------------------ compress

COMPRESS = ["compress", "--model", "@model", "--calib", "@plays.txt", "--calib-samples", 4, "--calib-seq-len", 32,
            "--out", "OUT"]


def _wrong_method(method, option, value=None):
    name = option.removeprefix("--no-").removeprefix("--")
    flag = f"--{name}/--no-{name}" if name in ("whiten", "stf") else option  # switches are named both ways
    return pytest.param(["--method", method, option] + ([value] if value is not None else []),
                        f"{flag} applies to --method", id=f"{method}{option}")


COMPRESS_CASES = [
    # an option the method does not have
    _wrong_method("auto", "--allocation", "global"),
    _wrong_method("dsformer", "--min-rank", 4),
    _wrong_method("cospadi", "--fisher-samples", 4),
    _wrong_method("svd", "--alpha", 0.5),
    _wrong_method("fwsvd", "--alpha", 0.5),
    _wrong_method("asvd", "--whiten"),
    _wrong_method("svdllm", "--no-whiten"),
    _wrong_method("svdllm", "--iterations", 3),
    _wrong_method("dsformer", "--refresh", "every"),
    _wrong_method("fwsvd", "--rho", 2),
    _wrong_method("svd", "--count", "storage"),
    _wrong_method("cospadi", "--pattern", "2:4"),
    _wrong_method("cospadi", "--blocks", 2),
    _wrong_method("svdllm", "--init", "svd"),
    _wrong_method("cospadi", "--no-stf"),
    _wrong_method("svdllm", "--train-steps", 3),
    _wrong_method("cospadi", "--train-lr", 0.1),
    _wrong_method("fwsvd", "--train-distill", 0.1),
    _wrong_method("svdllm", "--train-checkpoint-dir", "TMP/ck"),
    _wrong_method("dsformer", "--checkpoint-dir", "TMP/ck"),
    _wrong_method("dsformer", "--group", 2),
    _wrong_method("svd", "--fisher-axis", "in"),
    # an option that only applies with another setting
    pytest.param(["--method", "svdllm", "--min-rank", 4], "--min-rank applies only with --allocation global",
                 id="min-rank-uniform"),
    pytest.param(["--method", "fwsvd", "--min-rank", 4], "--min-rank applies only with --allocation global",
                 id="fwsvd-min-rank-uniform"),
    pytest.param(["--method", "asvd", "--allocation", "uniform", "--fisher-samples", 2],
                 "--fisher-samples applies only with --allocation global", id="fisher-samples-uniform"),
    pytest.param(["--method", "fwsvd", "--whiten", "--fisher-axis", "in"], "--fisher-axis must be out",
                 id="fisher-axis-in-whitened"),
    # numbers out of range or not finite
    pytest.param(["--ratio", 1], "--ratio must lie in (0, 1), got 1.0", id="ratio-1"),
    pytest.param(["--ratio", -1], "--ratio must lie in (0, 1), got -1.0", id="ratio-minus-1"),
    pytest.param(["--ratio", "inf"], "--ratio must lie in (0, 1), got inf", id="ratio-inf"),
    pytest.param(["--ratio=-inf"], "--ratio must lie in (0, 1), got -inf", id="ratio-minus-inf"),
    pytest.param(["--calib-samples", 0], "--calib-samples must be a whole number of at least 1", id="calib-samples-0"),
    pytest.param(["--calib-seq-len", 1], "--calib-seq-len must be a whole number of at least 2", id="calib-seq-len-1"),
    pytest.param(["--seq-len", 1], "--seq-len must be a whole number of at least 2", id="seq-len-1"),
    pytest.param(["--max-chunks", 0], "--max-chunks must be a whole number of at least 1", id="max-chunks-0"),
    pytest.param(["--batch-size", 0], "--batch-size must be a whole number of at least 1", id="batch-size-0"),
    pytest.param(["--seed", -1], "--seed must be a whole number of at least 0", id="seed-minus-1"),
    pytest.param(["--method", "asvd", "--alpha", "nan"], "--alpha must be a finite number of at least 0, got nan",
                 id="asvd-alpha-nan"),
    pytest.param(["--method", "asvd", "--alpha", -1], "--alpha must be a finite number of at least 0, got -1.0",
                 id="asvd-alpha-minus-1"),
    pytest.param(["--method", "cospadi", "--rho", 0.5], "--rho must be a finite number of at least 1.0",
                 id="rho-0.5"),
    pytest.param(["--method", "cospadi", "--iterations", 0], "--iterations must be a whole number of at least 1",
                 id="iterations-0"),
    pytest.param(["--method", "cospadi", "--refresh", "never"], "--refresh must be doubling, every or a positive",
                 id="refresh-never"),
    pytest.param(["--method", "cospadi", "--refresh", 0], "--refresh must be doubling, every or a positive",
                 id="refresh-0"),
    pytest.param(["--method", "cospadi", "--group", 0], "--group must be a whole number of at least 1", id="group-0"),
    pytest.param(["--method", "dsformer", "--pattern", "3:2"], "--pattern is not a sparsity pattern", id="pattern-3:2"),
    pytest.param(["--method", "dsformer", "--pattern", "abc"], "--pattern is not a sparsity pattern", id="pattern-abc"),
    pytest.param(["--method", "dsformer", "--blocks", 0], "--blocks must be a whole number of at least 1",
                 id="blocks-0"),
    pytest.param(["--method", "dsformer", "--blocks", 5, "--train-steps", 2], "does not divide the 32 rows",
                 id="blocks-not-dividing"),
    *[pytest.param(["--method", "dsformer", "--train-lr", v], f"--train-lr must be a positive finite number, got {s}",
                   id=f"train-lr-{v}") for v, s in (("inf", "inf"), ("nan", "nan"), (-1, "-1.0"), (0, "0.0"))],
    pytest.param(["--method", "dsformer", "--train-distill", "inf"], "--train-distill must be a finite number",
                 id="train-distill-inf"),
    pytest.param(["--method", "dsformer", "--train-distill", -1], "--train-distill must be a finite number",
                 id="train-distill-minus-1"),
    pytest.param(["--method", "dsformer", "--train-warmup", -5], "--train-warmup must be a whole number of at least 0",
                 id="train-warmup-minus-5"),
    pytest.param(["--method", "dsformer", "--train-steps", 0], "--train-steps must be a whole number of at least 1",
                 id="train-steps-0"),
    pytest.param(["--method", "svdllm", "--allocation", "global", "--min-rank", 0],
                 "--min-rank must be a whole number of at least 1", id="min-rank-0"),
    pytest.param(["--method", "svdllm", "--ratio", 0.999], "is below 1; use a smaller ratio", id="svdllm-rank-0"),
    pytest.param(["--method", "cospadi", "--ratio", 0.99, "--iterations", 2], "fewer than one nonzero per output",
                 id="cospadi-no-nonzero"),
    pytest.param(["--targets", ","], "--targets must be Linear names", id="targets-empty"),
    pytest.param(["--targets", "q_proj,q_prj"], "matches targets ['q_prj']", id="targets-one-misspelt"),
    # bad paths
    pytest.param(["--model", "@nocfg"], "is neither a model folder (with config.json) nor a .gguf file",
                 id="model-without-config"),
    pytest.param(["--model", "@garbage.gguf"], "is not a GGUF file transformers can read", id="gguf-garbage"),
    pytest.param(["--model", "@empty.gguf"], "is not a GGUF file transformers can read", id="gguf-empty"),
    pytest.param(["--model", "@badcfg"], "is not a model folder transformers can load", id="config-damaged"),
    pytest.param(["--model", "@missing-weight"], "lacks 1 of its model's weights", id="weight-missing"),
    pytest.param(["--model", "@pickled"], "pickled .bin files, which factorkit never reads", id="pickled-weights"),
    pytest.param(["--model", "@notok"], "has no tokenizer files", id="tokenizer-missing"),
    pytest.param(["--model", "@badtok"], "the tokenizer files in", id="tokenizer-damaged"),
    pytest.param(["--model", "@small-vocab"], "of 100; the tokenizer saved with the model does not match it",
                 id="tokenizer-too-big"),
    pytest.param(["--model", "@inf-model", "--method", "cospadi", "--iterations", 2],
                 f"the weight of {INF_WEIGHT} holds NaN or infinite values", id="cospadi-inf-weight"),
    pytest.param(["--calib", "@nothing.txt"], "not found", id="calib-missing"),
    pytest.param(["--method", "svd"], "--calib applies only to a method that calibrates", id="calib-for-data-free-svd"),
    pytest.param(["--calib", "@empty.txt"], "the calibration text has 0 tokens", id="calib-empty"),
    pytest.param(["--calib", "@latin1.txt"], "is not UTF-8 text", id="calib-not-utf8"),
    pytest.param(["--calib", "@other"], "is a folder", id="calib-a-folder"),
    pytest.param(["--method", "svdllm", "--eval", "@short.txt", "--seq-len", 32], "the evaluation text has",
                 id="eval-text-too-short"),
    pytest.param(["--method", "svdllm", "--eval", "@nothing.txt"], "not found", id="eval-text-missing"),
    pytest.param(["--out", "@afile/out"], "is a file", id="out-under-a-file"),
    pytest.param(["--out", "@afile", "--overwrite"], "is a file, not a folder", id="out-a-file"),
    pytest.param(["--out", "@model", "--overwrite"], "is or holds the input model", id="out-is-the-model"),
    pytest.param(["--out", "@", "--overwrite"], "is or holds the input model", id="out-holds-the-model"),
    pytest.param(["--out", "@other", "--overwrite"], "holds files factorkit did not write", id="out-foreign-folder"),
    pytest.param(["--json", "@other", "compress", "--method", "svdllm"], "--json", id="json-a-folder"),
    pytest.param(["--json", "@afile/report.json", "compress", "--method", "svdllm"], "is a file", id="json-under-a-file"),
    pytest.param(["--json", "TMP/new/report.json", "compress", "--calib", "@empty.txt"],
                 "the calibration text has 0 tokens", id="json-folder-not-made-on-failure"),
    # DSFormer that diverges: float16 training
    pytest.param(["--method", "dsformer", "--dtype", "float16", "--train-steps", 3],
                 "the training loss became nan", id="dsformer-float16-diverges"),
    pytest.param(["--method", "dsformer", "--train-steps", 2, "--train-checkpoint-dir", "@afile"], "is a file",
                 id="train-checkpoint-dir-a-file"),
    pytest.param(["--method", "cospadi", "--iterations", 2, "--checkpoint-dir", "@afile"], "is a file",
                 id="checkpoint-dir-a-file"),
]


@pytest.mark.parametrize("args, phrase", COMPRESS_CASES)
def test_compress_refuses(capsys, world, tmp_path, args, phrase):
    if args and args[0] == "--json":  # a global option goes before the command
        argv = ["--json", args[1], *COMPRESS, *args[3:]]
    else:
        argv = [*COMPRESS, *args]
    check_failure(capsys, world, tmp_path, argv, phrase)


def test_compress_without_out_says_how_to_name_it(capsys, world, tmp_path):
    argv = [a for a in COMPRESS if a != "OUT" and a != "--out"]
    check_failure(capsys, world, tmp_path, argv, "compress writes a model; name the folder with --out")


USAGE_CASES = [  # argparse's own refusals: SystemExit(2), one line, the same prefix
    pytest.param([*COMPRESS, "--dtype", "int8"], "invalid choice: 'int8'", id="compress-dtype-int8"),
    pytest.param([*COMPRESS, "--method", "nosuch"], "invalid choice: 'nosuch'", id="compress-method-nosuch"),
    pytest.param([*COMPRESS, "--allocation", "best"], "invalid choice: 'best'", id="compress-allocation-best"),
    pytest.param([*COMPRESS, "--calib-samples", 2.5], "'2.5' is not a whole number", id="compress-samples-2.5"),
    pytest.param([*COMPRESS, "--method", "dsformer", "--train-lr", "fast"], "'fast' is not a number",
                 id="compress-train-lr-word"),
    pytest.param([*COMPRESS, "--bogus"], "unrecognized arguments: --bogus", id="compress-bogus"),
    pytest.param(["eval", "--model", "@model", "--ratio", 0.2], "unrecognized arguments: --ratio",
                 id="eval-ratio"),
    pytest.param(["eval", "--model", "@model", "--out", "OUT"], "unrecognized arguments: --out", id="eval-out"),
    pytest.param(["eval", "--dtype", "int8"], "invalid choice: 'int8'", id="eval-dtype-int8"),
    pytest.param(["pretrain", "--dtype", "float16", "--out", "OUT"], "invalid choice: 'float16'",
                 id="pretrain-dtype-float16"),
    pytest.param(["pretrain", "--parallel", "zero", "--out", "OUT"], "invalid choice: 'zero'", id="pretrain-zero"),
    pytest.param(["pretrain", "--train-steps", 3, "--out", "OUT"], "unrecognized arguments: --train-steps",
                 id="pretrain-train-prefix"),
    pytest.param(["pretrain", "--distill", 0.5, "--out", "OUT"], "unrecognized arguments: --distill",
                 id="pretrain-distill"),
    pytest.param(["finetune", "--adapter", "ia3", "--out", "OUT"], "invalid choice: 'ia3'", id="finetune-ia3"),
    pytest.param(["finetune", "--temperature", 2, "--out", "OUT"], "unrecognized arguments: --temperature",
                 id="finetune-temperature"),
    pytest.param([], "the following arguments are required: COMMAND", id="no-command"),
]


@pytest.mark.parametrize("argv, phrase", USAGE_CASES)
def test_usage_errors_exit_2_in_one_line(capsys, world, tmp_path, argv, phrase):
    check_failure(capsys, world, tmp_path, argv, phrase, usage=True)


def test_dsformer_loss_turning_nan_at_step_2_stops_and_writes_nothing(capsys, world, tmp_path, monkeypatch):
    import factorkit.methods.dsformer as dsformer

    calls = []
    real = dsformer.model_loss

    def loss(*args, **kwargs):  # one micro-batch a step: the second call is step 2
        calls.append(1)
        value = real(*args, **kwargs)
        return value * math.nan if len(calls) == 2 else value

    monkeypatch.setattr(dsformer, "model_loss", loss)
    message = check_failure(capsys, world, tmp_path, [*COMPRESS, "--method", "dsformer", "--train-steps", 4],
                            "the training loss became nan at step 2")
    assert "--train-lr" in message  # the fix names this command's own options
    assert len(calls) == 2


@pytest.mark.parametrize("command", ["compress", "pretrain", "finetune"])
def test_a_pickled_train_state_is_refused_and_never_unpickled(capsys, world, tmp_path, command):
    argv = {"compress": [*COMPRESS, "--method", "dsformer", "--train-steps", 2, "--train-checkpoint-dir"],
            "pretrain": [*PRETRAIN, "--checkpoint-dir"],  # defined below
            "finetune": [*FINETUNE, "--checkpoint-dir"]}[command]
    check_failure(capsys, world, tmp_path, [*argv, "@pickled-ck"], "old pickled format (train_state.pt)")


def test_a_training_state_of_another_run_is_refused(capsys, world, tmp_path):
    args = [*COMPRESS[:-1], "TMP/first", "--method", "dsformer", "--train-steps", 2, "--train-checkpoint-dir",
            "TMP/ck"]
    capsys.readouterr()
    assert main(["-q", *(expand(a, world, tmp_path) for a in [*args, "--train-lr", "1e-3"])]) == 0
    assert (tmp_path / "ck" / "train_state.json").is_file()
    check_failure(capsys, world, tmp_path, [*args, "--train-lr", "2e-3", "--out", "OUT"],
                  "holds the training state of another run")


def test_finished_blocks_of_another_cospadi_run_are_refused(capsys, world, tmp_path):
    args = [*COMPRESS[:-1], "TMP/first", "--method", "cospadi", "--checkpoint-dir", "TMP/ck"]
    capsys.readouterr()
    assert main(["-q", *(expand(a, world, tmp_path) for a in [*args, "--iterations", 2])]) == 0
    check_failure(capsys, world, tmp_path, [*args, "--iterations", 3, "--out", "OUT"],
                  "holds the finished blocks of another run")


def test_json_into_a_folder_that_does_not_exist_creates_it_like_out(capsys, world, tmp_path):
    """The decision for --json: missing folders on the way are made, as for --out, but only once the
    command succeeds (a failing command leaves none: the json-folder-not-made-on-failure case)."""
    report = tmp_path / "reports" / "svd.json"
    capsys.readouterr()
    argv = ["-q", "--json", str(report), *(expand(a, world, tmp_path) for a in COMPRESS), "--method", "svdllm"]
    assert main(argv) == 0, capsys.readouterr().err
    assert json.loads(report.read_text())["compression"]["method"] == "svdllm"


# ---------------------------------------------------------------------------------------------- eval

EVAL = ["eval", "--model", "@model", "--text", "@plays.txt", "--seq-len", 32, "--max-chunks", 2]

EVAL_CASES = [
    pytest.param(["--seq-len", 1], "--seq-len must be a whole number of at least 2", id="seq-len-1"),
    pytest.param(["--max-chunks", 0], "--max-chunks must be a whole number of at least 1", id="max-chunks-0"),
    pytest.param(["--seed", -1], "--seed must be a whole number of at least 0", id="seed-minus-1"),
    pytest.param(["--text", "@nothing.txt"], "not found", id="text-missing"),
    pytest.param(["--text", "@short.txt"], "the evaluation text has", id="text-too-short"),
    pytest.param(["--text", "@empty.txt"], "the evaluation text has 0 tokens", id="text-empty"),
    pytest.param(["--text", "@other"], "is a folder", id="text-a-folder"),
    pytest.param(["--seq-len", 100000], "fewer than one sequence of 100000", id="seq-len-longer-than-text"),
    pytest.param(["--model", "@nothing"], "not found", id="model-missing"),
    pytest.param(["--model", "@nocfg"], "is neither a model folder", id="model-without-config"),
    pytest.param(["--model", "@garbage.gguf"], "is not a GGUF file transformers can read", id="gguf-garbage"),
    pytest.param(["--model", "@badcfg"], "is not a model folder transformers can load", id="config-damaged"),
    pytest.param(["--model", "@missing-weight"], "lacks 1 of its model's weights", id="weight-missing"),
    pytest.param(["--model", "@pickled"], "pickled .bin files", id="pickled-weights"),
    pytest.param(["--model", "@notok"], "has no tokenizer files", id="tokenizer-missing"),
    pytest.param(["--model", "@small-vocab"], "of 100; the tokenizer saved with the model does not match it",
                 id="tokenizer-too-big"),
    pytest.param(["--model", "@inf-model"], "NaN or infinite logits, try --dtype float32 or check the model's weights",
                 id="inf-weight"),
    pytest.param(["--json", "@other"], "--json", id="json-a-folder"),
]


@pytest.mark.parametrize("args, phrase", EVAL_CASES)
def test_eval_refuses(capsys, world, tmp_path, args, phrase):
    argv = ["--json", args[1], *EVAL] if args[0] == "--json" else [*EVAL, *args]
    check_failure(capsys, world, tmp_path, argv, phrase)


# ------------------------------------------------------------------------------------------ pretrain

PRETRAIN = ["pretrain", "--config", "@tiny.json", "--text", "@plays.txt", "--tokenizer", "bpe-300", "--seq-len", 16,
            "--steps", 2, "--batch-size", 2, "--eval-rows", 2, "--device", "cpu", "--out", "OUT"]

PRETRAIN_CASES = [
    pytest.param(["--param", "full", "--delta", 0.1], "--delta applies only with --param sltrain", id="full-delta"),
    pytest.param(["--param", "full", "--alpha", 8], "--alpha applies only with --param sltrain", id="full-alpha"),
    pytest.param(["--param", "lowrank", "--delta", 0.1], "--delta applies only with --param sltrain",
                 id="lowrank-delta"),
    pytest.param(["--lr", -1], "--lr must be a positive finite number", id="lr-minus-1"),
    pytest.param(["--lr", "nan"], "--lr must be a positive finite number", id="lr-nan"),
    pytest.param(["--warmup", -5], "--warmup must be a whole number of at least 0", id="warmup-minus-5"),
    pytest.param(["--delta", 0], "--delta must lie in (0, 1)", id="delta-0"),
    pytest.param(["--delta", 1], "--delta must lie in (0, 1)", id="delta-1"),
    pytest.param(["--delta", 1.5], "--delta must lie in (0, 1)", id="delta-1.5"),
    pytest.param(["--alpha", 0], "--alpha must be a positive finite number", id="alpha-0"),
    pytest.param(["--rank", 0], "--rank must be a whole number of at least 1", id="rank-0"),
    pytest.param(["--rank", 1000], "rank 1000 exceeds the smallest Linear dimension", id="rank-too-big"),
    pytest.param(["--steps", 0], "--steps must be a whole number of at least 1", id="steps-0"),
    pytest.param(["--batch-size", 0], "--batch-size must be a whole number of at least 1", id="batch-size-0"),
    pytest.param(["--grad-accum", 0], "--grad-accum must be a whole number of at least 1", id="grad-accum-0"),
    pytest.param(["--max-grad-norm", "nan"], "--max-grad-norm must be a finite number", id="max-grad-norm-nan"),
    pytest.param(["--weight-decay", -1], "--weight-decay must be a finite number of at least 0", id="weight-decay"),
    pytest.param(["--eval-every", 0], "--eval-every must be a whole number of at least 1", id="eval-every-0"),
    pytest.param(["--seq-len", 1], "--seq-len must be a whole number of at least 2", id="seq-len-1"),
    pytest.param(["--config", "unknown-name"], "unknown model config 'unknown-name'", id="config-unknown"),
    pytest.param(["--config", "@cfg-list.json"], "holds a JSON list, not an object", id="config-json-list"),
    pytest.param(["--config", "@cfg-heads.json"], "is not a multiple of the number of attention heads",
                 id="config-heads"),
    pytest.param(["--config", "@cfg-zero-layers.json"], "sets num_hidden_layers to 0", id="config-zero-layers"),
    pytest.param(["--tokenizer", "bpe-10"], "a byte-level BPE needs more than 256 tokens", id="tokenizer-bpe-10"),
    pytest.param(["--text", "@nothing.txt"], "not found", id="text-missing"),
    pytest.param(["--text", "@short.txt"], "the training text has", id="text-too-short"),
    pytest.param(["--out", "@afile/out"], "is a file", id="out-under-a-file"),
    pytest.param(["--out", "@other"], "already exists", id="out-exists"),
    pytest.param(["--out", "@other", "--overwrite"], "holds files factorkit did not write", id="out-foreign-folder"),
    pytest.param(["--device", "cuda"], "PyTorch sees no GPU", id="cuda-without-gpu",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is there")),
]


@pytest.mark.parametrize("args, phrase", PRETRAIN_CASES)
def test_pretrain_refuses(capsys, world, tmp_path, args, phrase):
    check_failure(capsys, world, tmp_path, [*PRETRAIN, *args], phrase)


# ------------------------------------------------------------------------------------------ finetune

FINETUNE = ["finetune", "--model", "@model", "--text", "@plays.txt", "--seq-len", 16, "--steps", 2, "--eval-rows", 2,
            "--out", "OUT"]

FINETUNE_CASES = [
    pytest.param(["--adapter", "lora", "--wavelet", "haar"], "--wavelet applies only with --adapter wara",
                 id="lora-wavelet"),
    pytest.param(["--adapter", "lora", "--levels", 1], "--levels applies only with --adapter wara", id="lora-levels"),
    pytest.param(["--adapter", "full", "--wavelet", "haar"], "--wavelet applies only with --adapter wara",
                 id="full-wavelet"),
    pytest.param(["--adapter", "full", "--levels", 1], "--levels applies only with --adapter wara", id="full-levels"),
    pytest.param(["--adapter", "full", "--r", 4], "--r applies only with --adapter wara or lora", id="full-r"),
    pytest.param(["--adapter", "full", "--alpha", 4], "--alpha applies only with --adapter wara or lora",
                 id="full-alpha"),
    pytest.param(["--adapter", "full", "--dropout", 0.1], "--dropout applies only with --adapter wara or lora",
                 id="full-dropout"),
    pytest.param(["--adapter", "full", "--targets", "q_proj"], "--targets applies only with --adapter wara or lora",
                 id="full-targets"),
    pytest.param(["--lr", -1], "--lr must be a positive finite number", id="lr-minus-1"),
    pytest.param(["--lr", "inf"], "--lr must be a positive finite number", id="lr-inf"),
    pytest.param(["--r", 0], "--r must be a whole number of at least 1", id="r-0"),
    pytest.param(["--alpha", "inf"], "--alpha must be a positive finite number", id="alpha-inf"),
    pytest.param(["--dropout", 1.5], "--dropout must lie in [0, 1)", id="dropout-1.5"),
    pytest.param(["--dropout", 1], "--dropout must lie in [0, 1)", id="dropout-1"),
    pytest.param(["--dropout", "nan"], "--dropout must lie in [0, 1)", id="dropout-nan"),
    pytest.param(["--levels", 9], "is not divisible by 2^9", id="levels-9"),
    pytest.param(["--levels", 0], "--levels must be a whole number of at least 1", id="levels-0"),
    pytest.param(["--wavelet", "nosuch"], "unknown wavelet 'nosuch'", id="wavelet-unknown"),
    pytest.param(["--wavelet", "bior2.2"], "is not orthogonal", id="wavelet-biorthogonal"),
    pytest.param(["--targets", "nosuch"], "matches target_modules ['nosuch']; the first block has", id="targets-none"),
    pytest.param(["--adapter", "lora", "--targets", "q_proj,v_prj"], "matches target_modules ['v_prj']",
                 id="targets-one-misspelt"),
    pytest.param(["--targets", ","], "--targets must be Linear names", id="targets-empty"),
    pytest.param(["--seq-len", 1], "--seq-len must be a whole number of at least 2", id="seq-len-1"),
    pytest.param(["--batch-size", 1000], "fewer than one batch of 1000", id="batch-size-above-text"),
    pytest.param(["--text", "@nothing.txt"], "not found", id="text-missing"),
    pytest.param(["--text", "@short.txt"], "the training text has", id="text-too-short"),
    pytest.param(["--model", "@nothing"], "not found", id="model-missing"),
    pytest.param(["--model", "@notok"], "has no tokenizer files", id="tokenizer-missing"),
    pytest.param(["--model", "@small-vocab"], "of 100; the tokenizer saved with the model does not match it",
                 id="tokenizer-too-big"),
    pytest.param(["--model", "@inf-model"], "NaN or infinite logits, check the weights of the model to fine-tune",
                 id="inf-weight"),
    pytest.param(["--adapter", "lora", "--r", 2, "--lr", "1e30"], "lower --lr", id="lora-diverges"),
    pytest.param(["--out", "@model", "--overwrite"], "is or holds the input model", id="out-is-the-model"),
    pytest.param(["--checkpoint-dir", "@afile"], "is a file", id="checkpoint-dir-a-file"),
]


@pytest.mark.parametrize("args, phrase", FINETUNE_CASES)
def test_finetune_refuses(capsys, world, tmp_path, args, phrase):
    message = check_failure(capsys, world, tmp_path, [*FINETUNE, *args], phrase)
    assert "--dtype" not in message and "ratio" not in message  # finetune has neither


# ----------------------------------------------------------------------------------------------- API

@pytest.fixture
def inf_llama():
    model = tiny_llama()
    with torch.no_grad():
        model.get_submodule(INF_WEIGHT).weight[0, 0] = math.inf
    return model


def _compressed():
    model = tiny_llama()
    fk.compress(model, fk.SVDConfig(ratio=0.3), None, progress=False)
    return model


def _with_id(calib, value):
    ids = calib.clone()
    ids[1, 3] = value
    return ids


# (id, call(llama, calib, tokenizer, world, tmp) -> anything, phrase)
API_CASES = [
    ("compress-id-above-vocab", lambda m, c, t, w, o: fk.compress(m, fk.SVDLLMConfig(), _with_id(c, 999),
                                                                  progress=False), "token id 999 is outside"),
    ("compress-id-negative", lambda m, c, t, w, o: fk.compress(m, fk.CoSpaDiConfig(iterations=2), _with_id(c, -3),
                                                               progress=False), "token id -3 is outside"),
    ("compress-float-data", lambda m, c, t, w, o: fk.compress(m, fk.SVDLLMConfig(), c.float(), progress=False),
     "calibration data must be a LongTensor"),
    ("compress-1d-data", lambda m, c, t, w, o: fk.compress(m, fk.SVDLLMConfig(), c[0], progress=False),
     "shape (samples, seq_len)"),
    ("compress-not-a-model", lambda m, c, t, w, o: fk.compress(None, fk.SVDConfig(), None),
     "model must be a torch.nn.Module"),
    ("compress-dict-config", lambda m, c, t, w, o: fk.compress(m, {"method": "svd"}, c),
     "config must be a method config such as SVDLLMConfig(ratio=0.2), got dict"),
    ("compress-train-config", lambda m, c, t, w, o: fk.compress(m, fk.TrainConfig(), c),
     "config must be a method config"),
    ("compress-twice", lambda m, c, t, w, o: fk.compress(_compressed(), fk.SVDConfig(), None),
     "this model is already compressed"),
    ("compress-a-linear", lambda m, c, t, w, o: fk.compress(torch.nn.Linear(4, 4), fk.SVDConfig(), None),
     "no list of repeated blocks"),
    ("perplexity-float-chunks", lambda m, c, t, w, o: perplexity(m, c.float(), progress=False),
     "chunks must be token ids"),
    ("perplexity-1d-chunks", lambda m, c, t, w, o: perplexity(m, c[0], progress=False), "chunks must be token ids"),
    ("run-a-string", lambda m, c, t, w, o: fk.run("compress"), "run() takes a CompressJob"),
    ("run-a-config", lambda m, c, t, w, o: fk.run(fk.SVDConfig()), "got SVDConfig"),
    ("run-none", lambda m, c, t, w, o: fk.run(None), "got NoneType"),
    ("run-pretrain-with-a-model", lambda m, c, t, w, o: fk.run(fk.PretrainJob(), model=(m, t)),
     "builds its own model"),
    ("run-compress-foreign-out", lambda m, c, t, w, o: fk.run(fk.CompressJob(
        model=str(w / "model"), method=fk.SVDConfig(), out=str(w / "other"), overwrite=True), progress=False),
     "holds files factorkit did not write"),
    ("run-compress-tokenizer-does-not-fit", lambda m, c, t, w, o: fk.run(fk.CompressJob(
        model="given", calib=str(w / "plays.txt"), calib_samples=2, calib_seq_len=16), progress=False,
        model=(tiny_llama(vocab=100), t)), "the tokenizer passed with the model does not match it"),
    ("run-eval-no-tokenizer", lambda m, c, t, w, o: fk.run(fk.EvalJob(model=str(w / "notok")), progress=False),
     "has no tokenizer files"),
    ("from-dict-unknown-method", lambda m, c, t, w, o: fk.CompressionConfig.from_dict({"method": "nosuch"}),
     "unknown method 'nosuch'"),
    ("from-dict-unknown-key", lambda m, c, t, w, o: fk.CompressionConfig.from_dict({"method": "svd", "rank": 4}),
     "SVDConfig has no setting 'rank'"),
    ("from-dict-no-method", lambda m, c, t, w, o: fk.CompressionConfig.from_dict({"ratio": 0.3}),
     "the settings name no method"),
    ("from-dict-a-string", lambda m, c, t, w, o: fk.CompressionConfig.from_dict("svd"), "needs a mapping"),
    ("from-dict-none", lambda m, c, t, w, o: fk.CompressionConfig.from_dict(None), "needs a mapping"),
    ("from-dict-nested-unknown-key", lambda m, c, t, w, o: fk.DSFormerConfig.from_dict({"train": {"step": 3}}),
     "TrainConfig has no setting 'step'"),
    ("from-dict-nested-not-a-dict", lambda m, c, t, w, o: fk.DSFormerConfig.from_dict({"train": 5}),
     "train must be a TrainConfig, got int"),
    ("nested-none", lambda m, c, t, w, o: fk.DSFormerConfig(train=None), "train must be a TrainConfig"),
    ("ratio-0", lambda m, c, t, w, o: fk.SVDLLMConfig(ratio=0), "ratio must lie in (0, 1)"),
    ("ratio-nan", lambda m, c, t, w, o: fk.SVDLLMConfig(ratio=math.nan), "ratio must lie in (0, 1)"),
    ("ratio-a-string", lambda m, c, t, w, o: fk.CoSpaDiConfig(ratio="0.2"), "ratio must lie in (0, 1)"),
    ("ratio-true", lambda m, c, t, w, o: fk.DSFormerConfig(ratio=True), "ratio must lie in (0, 1)"),
    ("whiten-a-string", lambda m, c, t, w, o: fk.CoSpaDiConfig(whiten="no"), "whiten must be True or False"),
    ("stf-an-int", lambda m, c, t, w, o: fk.DSFormerConfig(stf=0), "stf must be True or False"),
    ("refresh-true", lambda m, c, t, w, o: fk.CoSpaDiConfig(refresh=True), "refresh must be doubling"),
    ("alpha-inf", lambda m, c, t, w, o: fk.ASVDConfig(alpha=math.inf), "alpha must be a finite number"),
    ("train-lr-a-string", lambda m, c, t, w, o: fk.TrainConfig(lr="1e-3"), "lr must be a positive finite number"),
    ("pretrain-dtype-float16", lambda m, c, t, w, o: PretrainConfig(dtype="float16"),
     "dtype must be one of float32, bfloat16"),
    ("pretrain-param-unknown", lambda m, c, t, w, o: PretrainConfig(param="dense"), "param must be one of"),
    ("pretrain-job-none", lambda m, c, t, w, o: fk.PretrainJob(config=None), "config must be a PretrainConfig"),
    ("finetune-adapter-unknown", lambda m, c, t, w, o: FinetuneConfig(adapter="ia3"), "adapter must be one of"),
    ("finetune-targets-not-names", lambda m, c, t, w, o: FinetuneConfig(target_modules=[3]),
     "target_modules must be Linear names"),
    ("finetune-job-a-string", lambda m, c, t, w, o: fk.FinetuneJob(config="wara"),
     "config must be a FinetuneConfig, got str"),
    ("compress-job-method-a-string", lambda m, c, t, w, o: fk.CompressJob(method="svd"),
     "method must be a method config"),
    ("compress-job-method-unknown", lambda m, c, t, w, o: fk.CompressJob(method={"method": "nosuch"}),
     "unknown method 'nosuch'"),
    ("eval-job-dtype", lambda m, c, t, w, o: fk.EvalJob(dtype="int8"), "dtype must be one of"),
    ("calib-samples-0", lambda m, c, t, w, o: calibration_tokens(t, w / "plays.txt", n_samples=0),
     "need at least 1 sample"),
    ("calib-seq-len-1", lambda m, c, t, w, o: calibration_tokens(t, w / "plays.txt", seq_len=1),
     "need at least 1 sample of at least 2 tokens"),
    ("calib-samples-fraction", lambda m, c, t, w, o: calibration_tokens(t, w / "plays.txt", n_samples=2.5),
     "whole numbers"),
    ("calib-longer-than-text", lambda m, c, t, w, o: calibration_tokens(t, w / "short.txt", seq_len=64),
     "fewer than one batch of 64"),
    ("calib-split-unknown", lambda m, c, t, w, o: calibration_tokens(t, w / "plays.txt", split="train"),
     "unknown split 'train'"),
    ("calib-missing", lambda m, c, t, w, o: calibration_tokens(t, w / "nothing.txt"), "not found"),
    ("eval-seq-len-1", lambda m, c, t, w, o: eval_tokens(t, w / "plays.txt", seq_len=1),
     "seq_len must be at least 2"),
    ("eval-max-chunks-0", lambda m, c, t, w, o: eval_tokens(t, w / "plays.txt", seq_len=32, max_chunks=0),
     "max_chunks must be a whole number of at least 1"),
    ("eval-max-chunks-negative", lambda m, c, t, w, o: eval_tokens(t, w / "plays.txt", seq_len=32, max_chunks=-1),
     "max_chunks must be a whole number of at least 1"),
    ("eval-empty-text", lambda m, c, t, w, o: eval_tokens(t, w / "empty.txt", seq_len=32),
     "the evaluation text has 0 tokens"),
    ("load-missing", lambda m, c, t, w, o: fk.models.load(w / "nothing"), "not found"),
    ("load-gguf-garbage", lambda m, c, t, w, o: fk.models.load(w / "garbage.gguf"), "is not a GGUF file"),
    ("load-weight-missing", lambda m, c, t, w, o: fk.models.load(w / "missing-weight"), "lacks 1 of its model's"),
    ("load-pickled-weights", lambda m, c, t, w, o: fk.models.load(w / "pickled"), "never reads"),
    ("load-config-damaged", lambda m, c, t, w, o: fk.models.load(w / "badcfg"), "transformers can load"),
    ("factorkit-load-a-plain-folder", lambda m, c, t, w, o: fk.load(w / "model"),
     "is not a folder written by factorkit.save"),
]


@pytest.mark.parametrize("call, phrase", [pytest.param(call, phrase, id=name) for name, call, phrase in API_CASES])
def test_api_refuses(world, tmp_path, llama, calib, tokenizer, call, phrase):
    before = snapshot(world, tmp_path)
    with pytest.raises(FactorkitError) as err:
        call(llama, calib, tokenizer, world, tmp_path)
    message = str(err.value)
    assert one_sentence(message) and phrase in message, message
    assert snapshot(world, tmp_path) == before
    assert not (world / "marker").exists()


def test_cospadi_on_a_model_with_an_inf_weight_names_it_and_changes_nothing(inf_llama, calib):
    before = {k: v.clone() for k, v in inf_llama.state_dict().items()}
    with pytest.raises(FactorkitError) as err:
        fk.compress(inf_llama, fk.CoSpaDiConfig(ratio=0.3, iterations=2), calib, progress=False)
    assert one_sentence(str(err.value)) and INF_WEIGHT in str(err.value)
    assert not list(factor_modules(inf_llama))
    after = inf_llama.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_dsformer_divergence_through_the_api_is_a_factorkit_error(calib, monkeypatch):
    import factorkit.methods.dsformer as dsformer

    real = dsformer.model_loss
    monkeypatch.setattr(dsformer, "model_loss", lambda *a, **k: real(*a, **k) * math.nan)
    with pytest.raises(NonFiniteLossError) as err:  # a FactorkitError
        fk.compress(tiny_llama(), fk.DSFormerConfig(ratio=0.3, train=fk.TrainConfig(steps=3)), calib, progress=False)
    assert isinstance(err.value, FactorkitError)
    assert str(err.value).startswith("the training loss became nan at step 1;") and one_sentence(str(err.value))
