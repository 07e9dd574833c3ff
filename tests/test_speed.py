"""factorkit bench-speed (factorkit.eval.speed): rows against the reference, the bytes each model holds, the
resident-memory probe, and bad input refused before any model is timed."""

import json
import sys
import time

import pytest
import torch

import factorkit as fk
from factorkit.cli import main
from factorkit.eval.speed import PeakResident, held_bytes, release_memory, resident_bytes

from conftest import tiny_llama

FAST = ["--new-tokens", "3", "--batch-sizes", "1,2", "--prefill", "8,16", "--repeats", "1"]


def test_held_bytes_counts_each_storage_once_and_quantized_weights_as_held():
    model = tiny_llama()
    model.lm_head.weight = model.model.embed_tokens.weight  # tied: one storage
    unique = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert held_bytes(model) == sum(unique.values()) + buffers
    linears = [m for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    numbers, rows = sum(m.weight.numel() for m in linears), sum(m.out_features for m in linears)
    fk.quantize(model, "int8")
    # int8: one byte per number of the block matrices instead of four, plus a float32 scale and an int8 zero
    # point (all zero: symmetric) per row
    assert held_bytes(model) - (sum(unique.values()) + buffers) == -3 * numbers + 5 * rows


@pytest.mark.skipif(resident_bytes() is None, reason="the resident set size is read from /proc (Linux)")
def test_the_resident_probe_sees_a_short_lived_allocation():
    release_memory()
    with PeakResident() as peak:
        before = resident_bytes()
        block = torch.ones(16 * 2**20)  # 64 MiB, touched
        time.sleep(0.05)  # alive for 50 sampling intervals, then gone before the probe's last read at exit (a
        del block  # busy machine can delay the sampling thread past a block freed as soon as it is filled)
    assert peak.peak - before >= 60 * 2**20


def test_bench_speed_rows_against_the_reference(model_dir, tmp_path, capsys, calib):
    compressed = tmp_path / "lowrank"
    model = tiny_llama()
    fk.compress(model, fk.SVDConfig(ratio=0.4), progress=False)
    fk.save(model, compressed)
    out = tmp_path / "speed.json"
    code = main(["-q", "--json", str(out), "bench-speed", "--model", str(model_dir), "--compare", str(compressed),
                 "--quantize", "int8", *FAST])
    assert code == 0
    result = json.loads(out.read_text())
    rows = {r["label"]: r for r in result["rows"]}
    assert list(rows) == [str(model_dir), f"{model_dir} int8", str(compressed)]
    dense, int8, lowrank = rows.values()
    for row in rows.values():
        assert set(row["decode_tok_s"]) == {"1", "2"} and set(row["prefill_s"]) == {"8", "16"}
        assert all(v > 0 for v in [*row["decode_tok_s"].values(), *row["prefill_s"].values()])
    # low rank: the parameters the factors removed; int8: three bytes of four of every block matrix (less the
    # scales and zero points)
    removed = sum(p.numel() for p in tiny_llama().parameters()) - sum(p.numel() for p in model.parameters())
    assert dense["held_bytes"] - lowrank["held_bytes"] == 4 * removed
    blocks = sum(m.weight.numel() * 4 for m in tiny_llama().model.layers.modules() if isinstance(m, torch.nn.Linear))
    assert dense["held_bytes"] - int8["held_bytes"] == pytest.approx(0.75 * blocks, rel=0.05)
    table = capsys.readouterr().out
    assert table.count("(1.00x)") >= 6  # the reference against itself, in each of the six columns


@pytest.mark.parametrize("args,message", [
    (["--compare", "no/such/folder/"], "'no/such/folder/' not found"),
    (["--prefill", "8,100000"], "--prefill 100000 is longer than the"),
    (["--batch-sizes", "0"], "--batch-sizes must list one or more batch sizes"),
    (["--batch-sizes", "one"], "'one' is not a whole number"),
    (["--quantize", "int3"], "--quantize must list schemes among int8, int4"),
    (["--quantize", "int8,int8"], "--quantize names a scheme twice"),
])
def test_bench_speed_refuses_bad_input_before_timing(model_dir, capsys, monkeypatch, args, message):
    timed = []
    monkeypatch.setattr("factorkit.eval.speed.measure", lambda *a, **k: timed.append(a) or sys.exit("timed"))
    with pytest.raises(SystemExit) as exit_info:
        code = main(["bench-speed", "--model", str(model_dir), *FAST, *args])
        raise SystemExit(code)
    assert exit_info.value.code == 2 and not timed
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
