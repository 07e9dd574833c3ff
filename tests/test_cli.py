"""The command line: end to end on a tiny model folder, and every bad input
ends in one sentence, exit status 2 and nothing written."""

import pytest
import torch

import factorkit as fk
from factorkit.cli import main
from factorkit.factors import LowRankLinear


def run(capsys, *argv):
    capsys.readouterr()  # drop what fixtures printed
    code = main(["-q", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_compress_then_eval_a_model_folder(capsys, model_dir, text_file, tmp_path):
    out_dir = tmp_path / "compressed"
    code, out, err = run(capsys, "compress", "--model", model_dir, "--method", "svdllm", "--ratio", 0.3,
                         "--calib", text_file, "--calib-samples", 4, "--calib-seq-len", 32,
                         "--eval", text_file, "--seq-len", 64, "--max-chunks", 2, "--out", out_dir)
    assert code == 0, err
    assert "perplexity" in out and "Saved to" in out
    model = fk.load(out_dir)
    assert fk.summarize(model).ratio_targeted >= 0.3
    code, out, err = run(capsys, "eval", "--model", out_dir, "--text", text_file, "--seq-len", 64)
    assert code == 0, err
    assert "svdllm" in out and "tokens counted" in out


def _assert_clean_failure(code, out, err, tmp_path, expected):
    assert code == 2
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and expected in errors[0], err  # one sentence
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_missing_model_path(capsys, tmp_path):
    code, out, err = run(capsys, "compress", "--model", tmp_path / "no-such-model", "--out", tmp_path / "out")
    _assert_clean_failure(code, out, err, tmp_path, "not found")


@pytest.mark.parametrize("ratio", ["1.5", "0", "-0.1", "abc", "nan"])
def test_ratio_outside_unit_interval(capsys, tmp_path, ratio):
    try:
        code = main(["compress", "--ratio", ratio, "--out", str(tmp_path / "out")])
    except SystemExit as exc:  # argparse: not a number at all
        code = exc.value.code if hasattr(exc, "value") else exc.code
    err = capsys.readouterr().err
    _assert_clean_failure(code, "", err, tmp_path, "--ratio")


def test_too_little_calibration_text(capsys, model_dir, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Fair is foul, and foul is fair.")
    code, out, err = run(capsys, "compress", "--model", model_dir, "--calib", short, "--out", tmp_path / "out")
    _assert_clean_failure(code, out, err, tmp_path, "fewer than one batch")


def test_existing_output_folder_is_not_clobbered(capsys, model_dir, text_file, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    code, out, err = run(capsys, "compress", "--model", model_dir, "--calib", text_file, "--out", tmp_path / "out")
    assert code == 2 and "already exists" in err
    assert (tmp_path / "out" / "mine.txt").read_text() == "keep"


def test_folder_that_is_not_a_model(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    code, out, err = run(capsys, "eval", "--model", tmp_path / "empty")
    assert code == 2 and "neither a model folder" in err


def test_hub_id_offline_says_so(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, out, err = run(capsys, "eval", "--model", "factorkit-test/definitely-not-cached")
    assert code == 2 and "Hugging Face Hub" in err and "offline" in err


def test_model_without_linear_layers(capsys, tmp_path, monkeypatch, text_file, model_dir):
    """A model whose blocks hold no Linear layer is refused before anything is written."""
    import factorkit.models as models

    class Empty(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)

    real_load = models.load
    monkeypatch.setattr(models, "load", lambda *a, **k: (Empty(), real_load(model_dir)[1]))
    code, out, err = run(capsys, "compress", "--model", model_dir, "--method", "svd", "--out", tmp_path / "out")
    _assert_clean_failure(code, out, err, tmp_path, "no list of repeated blocks containing Linear layers")


def test_fwsvd_with_global_allocation_from_the_command_line(capsys, model_dir, text_file, tmp_path):
    out_dir = tmp_path / "fwsvd"
    code, out, err = run(capsys, "compress", "--model", model_dir, "--method", "fwsvd", "--whiten",
                         "--allocation", "global", "--min-rank", 1, "--ratio", 0.3, "--calib", text_file,
                         "--calib-samples", 4, "--calib-seq-len", 32, "--out", out_dir)
    assert code == 0, err
    model = fk.load(out_dir)
    assert fk.summarize(model).ratio_targeted >= 0.3
    config = fk.compression_record(model)["config"]
    assert (config["allocation"], config["fisher_axis"], config["whiten"]) == ("global", "out", True)
    ranks = {m.rank for m in model.modules() if isinstance(m, LowRankLinear)}
    assert len(ranks) > 2  # not one uniform rank per shape


def test_fwsvd_options_on_another_method_fail_cleanly(capsys, tmp_path):
    code, out, err = run(capsys, "compress", "--method", "svdllm", "--whiten", "--out", tmp_path / "out")
    _assert_clean_failure(code, out, err, tmp_path, "--whiten/--no-whiten applies to --method cospadi or fwsvd only")


@pytest.mark.parametrize("command", ["compress", "eval", "finetune", "pretrain"])
def test_every_command_prints_its_help(command, capsys):
    """argparse formats help with %: a help text holding "10%" must not crash --help (it did for TrainConfig)."""
    from factorkit.cli import main

    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--seed" in out or "--steps" in out or "--text" in out
    if command in ("compress", "finetune", "pretrain"):
        assert "%" in out  # the percent signs of the help texts survive, escaped for argparse
