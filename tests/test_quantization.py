"""Weight-only quantization (torchao) on dense and compressed models: the error bound of round to nearest,
what is quantized and what is not, honest byte counts, and folders that reload to identical logits."""

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

import factorkit as fk
from factorkit.cli import main
from factorkit.errors import FactorkitError
from factorkit.factors import DictionaryLinear, LowRankLinear
from factorkit import kernels
from factorkit.factors.base import int8_parts, linear, plain
from factorkit.quantization import (QuantizedEmbedding, QuantizedLinear, is_quantized, packed_int4, quantize_tensor,
                                   unpacked_int4)

pytest.importorskip("torchao")


def _block_matrices(model):
    layer = model.model.layers[0]
    return [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.mlp.down_proj]


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_round_to_nearest_error_is_within_half_a_step(scheme):
    torch.manual_seed(0)
    w = torch.randn(48, 96) * torch.logspace(-2, 1, 48)[:, None]  # rows of very different scale
    q, how = quantize_tensor(w, scheme, 32)
    assert how == "rows" and is_quantized(q)
    err = (plain(q) - w).abs()
    if scheme == "int8":  # one scale per row: max|w| / 127, half a step of error at most
        bound = w.abs().amax(1, keepdim=True) / 127 / 2
    else:  # one scale per 32 numbers of a row, 16 levels: max|w| / 7.5, half a step
        bound = (w.abs().view(48, 3, 32).amax(2, keepdim=True) / 7.5 / 2).expand(48, 3, 32).reshape(48, 96)
    assert bool((err <= bound * (1 + 1e-5) + 1e-8).all())


def test_int4_groups_down_the_columns_or_falls_back_to_int8_when_rows_do_not_split():
    torch.manual_seed(0)
    q, how = quantize_tensor(torch.randn(64, 7), "int4", 32)  # a rank-7 U: 7 numbers per row, 64 rows
    assert how == "columns" and q.block_size == (32, 1)
    q, how = quantize_tensor(torch.randn(5, 7), "int4", 32)
    assert how == "int8" and getattr(q, "target_dtype", None) != torch.int4


def test_int4_packing_round_trips_every_value_and_odd_widths():
    q = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 1)[:, :15]  # 15 columns: the last byte half used
    packed = packed_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 8)
    assert torch.equal(unpacked_int4(packed, 15), q)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_dense_model_quantizes_block_matrices_only_and_bytes_shrink(llama, calib, scheme):
    with torch.no_grad():
        ref = llama(input_ids=calib[:2]).logits
    embed = llama.model.embed_tokens.weight
    report = fk.quantize(llama, scheme, group_size=32)
    assert len(report.tensors) == 2 * 7 and not report.int8_fallback
    assert all(is_quantized(m.weight) for m in _block_matrices(llama))
    assert llama.model.embed_tokens.weight is embed and llama.lm_head.weight is embed  # kept, still tied
    # their numbers took 4 bytes each and now 1 (int8) or 1/2 (int4), plus a float32 scale and an int8 zero
    # point per row of 32 or 64 numbers (int8) or per 32 numbers (int4): at most 5/32 byte per number
    numbers = sum(m.weight.numel() for m in _matrices(llama))
    added = report.bytes_after - (report.bytes_before - numbers * (4 - (1 if scheme == "int8" else 0.5)))
    assert 0 < added <= numbers * 5 / 32
    with torch.no_grad():
        out = llama(input_ids=calib[:2]).logits
    rel = float((out - ref).norm() / ref.norm())
    assert rel < (0.02 if scheme == "int8" else 0.25)


def _matrices(model):
    return [m for layer in model.model.layers for m in layer.modules() if isinstance(m, nn.Linear)
            and m is not model.lm_head]


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_factors_are_quantized_and_every_dictionary_kernel_agrees(llama, calib, scheme, tmp_path):
    fk.compress(llama, fk.CoSpaDiConfig(ratio=0.3, iterations=2, group=2), calib, progress=False)
    report = fk.quantize(llama, scheme, group_size=32)
    q = llama.model.layers[0].self_attn.q_proj
    assert isinstance(q, DictionaryLinear) and is_quantized(q.atoms) and is_quantized(q.values)
    # the dictionary shared by the two layers is quantized once and still shared
    assert llama.model.layers[1].self_attn.q_proj.atoms is q.atoms
    assert sum(name.endswith("q_proj.atoms") for name in report.tensors) == 1
    x = torch.randn(5, q.in_features)
    want = x @ q.dense_weight().T
    compiled = kernels.usable(kernels.dictionary())  # the mask kernel reads the int8 values as stored
    for kernel in ("codes", "gather", "sparse", "dense", *compiled):
        q.kernel = kernel
        with torch.no_grad():
            torch.testing.assert_close(q(x), want, rtol=1e-4, atol=1e-5)
    q.kernel = "auto"
    torch.testing.assert_close(q(x), want, rtol=1e-4, atol=1e-5)
    # saved once, shared again after loading, same logits
    before = llama(input_ids=calib[:2]).logits
    again = fk.load(fk.save(llama, tmp_path / "c"))
    assert again.model.layers[1].self_attn.q_proj.atoms is again.model.layers[0].self_attn.q_proj.atoms
    assert is_quantized(again.model.layers[1].self_attn.q_proj.atoms)
    assert torch.equal(again(input_ids=calib[:2]).logits, before)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_compressed_model_reloads_to_identical_logits(llama, calib, tmp_path, tokenizer, scheme):
    fk.compress(llama, fk.SVDLLMConfig(ratio=0.3), calib, progress=False)
    report = fk.quantize(llama, scheme, group_size=32)
    assert all(isinstance(m, LowRankLinear) and is_quantized(m.U) and is_quantized(m.V)
               for m in _block_matrices(llama))
    before = llama(input_ids=calib[:2]).logits
    folder = fk.save(llama, tmp_path / "q", tokenizer=tokenizer)
    again = fk.load(folder)
    assert torch.equal(again(input_ids=calib[:2]).logits, before)
    assert is_quantized(again.model.layers[0].self_attn.q_proj.U)
    assert again.lm_head.weight.data_ptr() == again.model.embed_tokens.weight.data_ptr()
    # the file holds what stored_bytes counts (int4 numbers two per byte), plus its header
    file = folder / "model.safetensors"
    with safe_open(str(file), "pt") as f:
        width = {"F32": 4, "I8": 1, "U8": 1}
        data = sum(torch.Size(f.get_slice(k).get_shape()).numel() * width[f.get_slice(k).get_dtype()] for k in f.keys())
    assert data == report.bytes_after == fk.stored_bytes(again)
    manifest = json.loads((folder / "factorkit.json").read_text())
    assert manifest["quantization"]["scheme"] == scheme and manifest["format_version"] == 2
    # a second quantization of a quantized model is refused
    with pytest.raises(FactorkitError, match="already quantized"):
        fk.quantize(again, "int8")


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_head_quantizes_with_its_tied_embeddings_and_reloads_tied(llama, calib, tmp_path, scheme):
    """head=True: the LM head and the input embeddings tied to it become one quantized tensor (stored once,
    looked up row by row), the rest of the model as without it; the folder reloads tied, to identical logits."""
    embed = llama.model.embed_tokens.weight.detach().clone()
    with torch.no_grad():
        ref = llama(input_ids=calib[:2]).logits
    body = fk.quantize(fk.load(fk.save(llama, tmp_path / "float")), scheme, group_size=32)
    report = fk.quantize(llama, scheme, group_size=32, head=True)
    assert report.tensors == [*body.tensors, "model.embed_tokens.weight"]  # named as the file stores it
    head = llama.lm_head.weight
    assert is_quantized(head) and llama.model.embed_tokens.weight is head and isinstance(llama.lm_head, QuantizedLinear)
    # the tied matrix (vocab x hidden) went from 4 bytes a number to 1 (or 1/2) plus its scales, once
    numbers = embed.numel()
    saved = body.bytes_after - report.bytes_after
    assert numbers * (3 if scheme == "int8" else 3.5) - numbers / 4 <= saved <= numbers * (3 if scheme == "int8" else 3.5)
    # the lookup reads just the quantized rows asked for: what torchao's whole-table conversion gives, each
    # within half a step (per row, or per group of 32) of the float one
    assert isinstance(llama.model.embed_tokens, QuantizedEmbedding)
    ids = torch.tensor([[0, 5, 17], [255, 5, 3]])
    rows = llama.model.embed_tokens(ids)
    assert torch.equal(rows, torch.nn.functional.embedding(ids, head.dequantize()))
    step = embed[ids].abs().amax(dim=-1, keepdim=True) / (127 if scheme == "int8" else 7)
    assert bool(((rows - embed[ids]).abs() <= step / 2 + 1e-6).all())
    with torch.no_grad():
        out = llama(input_ids=calib[:2]).logits
    assert float((out - ref).norm() / ref.norm()) < (0.03 if scheme == "int8" else 0.3)
    again = fk.load(fk.save(llama, tmp_path / "q"))
    assert again.model.embed_tokens.weight is again.lm_head.weight and is_quantized(again.lm_head.weight)
    assert torch.equal(again(input_ids=calib[:2]).logits, out)
    assert fk.stored_bytes(again) == report.bytes_after


class _ScaledEmbedding(nn.Embedding):  # as Gemma's: the lookup times a constant
    def forward(self, ids):
        return super().forward(ids) * 3.0


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_lookup_keeps_a_subclass_forward_and_reads_grouped_columns(scheme):
    torch.manual_seed(0)
    module = _ScaledEmbedding(96, 64)
    q, how = quantize_tensor(module.weight, scheme, 32)
    module.weight = nn.Parameter(q, requires_grad=False)
    fk.quantization.route(nn.Sequential(module))
    assert isinstance(module, (_ScaledEmbedding, QuantizedEmbedding))
    ids = torch.tensor([1, 95, 40, 1])
    torch.testing.assert_close(module(ids), 3.0 * q.dequantize()[ids], rtol=0, atol=0)
    # a table whose rows do not split into groups of 32 is grouped down its columns: looked up the same
    tall = nn.Embedding(64, 40)
    q, how = quantize_tensor(tall.weight, scheme, 32)
    assert how == ("rows" if scheme == "int8" else "columns")
    tall.weight = nn.Parameter(q, requires_grad=False)
    fk.quantization.route(nn.Sequential(tall))
    assert torch.equal(tall(torch.tensor([[0, 63], [31, 32]])), q.dequantize()[torch.tensor([[0, 63], [31, 32]])])


def test_head_option_needs_a_scheme_and_a_linear_head(llama):
    with pytest.raises(FactorkitError, match="applies only with --quantize"):
        fk.CompressJob(model="x", quantize_head=True)
    llama.lm_head = nn.Identity()
    with pytest.raises(FactorkitError, match="no nn.Linear LM head"):
        fk.quantize(llama, "int8", head=True)


def test_quantized_dense_folder_is_refused_by_plain_transformers_and_reloads(llama, calib, tmp_path):
    fk.quantize(llama, "int4", group_size=32)
    before = llama(input_ids=calib[:2]).logits
    folder = fk.save(llama, tmp_path / "dense-int4")
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "factorkit"  # custom code: never loaded as a float model with random layers
    assert torch.equal(fk.load(folder)(input_ids=calib[:2]).logits, before)
    with pytest.raises(FactorkitError, match="load it in float32"):
        fk.load(folder, dtype="bfloat16")


def test_damaged_quantized_folder_fails_with_one_sentence(llama, tmp_path):
    fk.quantize(llama, "int4", group_size=32)
    folder = fk.save(llama, tmp_path / "q")
    manifest = json.loads((folder / "factorkit.json").read_text())
    manifest["quantization"]["scheme"] = "int8"  # the file holds packed int4 numbers
    (folder / "factorkit.json").write_text(json.dumps(manifest))
    with pytest.raises(FactorkitError, match="damaged"):
        fk.load(folder)
    manifest["quantization"]["scheme"] = "int3"
    (folder / "factorkit.json").write_text(json.dumps(manifest))
    with pytest.raises(FactorkitError, match="damaged"):
        fk.load(folder)


def test_bad_settings_and_unsupported_modules_are_refused(llama, calib):
    with pytest.raises(FactorkitError, match="scheme 'int2' is unknown"):
        fk.quantize(llama, "int2")
    with pytest.raises(FactorkitError, match="group size 48"):
        fk.quantize(llama, "int4", group_size=48)
    fk.compress(llama, fk.DSFormerConfig(ratio=0.3, train=fk.TrainConfig(steps=1)), calib, progress=False)
    assert fk.quantize(llama, "int8").tensors  # DSFormer's exported layers are dictionaries: supported


def test_cli_quantize_writes_a_folder_that_reloads_and_evaluates(model_dir, tmp_path, capsys, text_file):
    out = tmp_path / "int4"
    assert main(["-q", "quantize", "--model", str(model_dir), "--quantize", "int4", "--group-size", "64",
                 "--eval", str(text_file), "--seq-len", "32", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "stored bytes of the model" in printed and "perplexity" in printed
    model = fk.load(out)
    assert is_quantized(model.model.layers[0].mlp.up_proj.weight)
    assert main(["-q", "eval", "--model", str(out), "--text", str(text_file), "--seq-len", "32"]) == 0
    assert "perplexity" in capsys.readouterr().out
    assert main(["-q", "quantize", "--model", str(out), "--out", str(tmp_path / "twice")]) == 2
    assert "quantized already" in capsys.readouterr().err
    assert main(["-q", "quantize", "--model", str(model_dir), "--quantize", "int8", "--group-size", "64",
                 "--out", str(tmp_path / "x")]) == 2
    assert "--group-size applies only with --quantize int4" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_cli_compress_then_quantize_measures_and_saves(model_dir, tmp_path, capsys, monkeypatch, text_file):
    out = tmp_path / "svdllm-int8"
    assert main(["-q", "compress", "--model", str(model_dir), "--method", "svdllm", "--ratio", "0.3",
                 "--calib", str(text_file), "--calib-samples", "4", "--calib-seq-len", "32", "--eval", str(text_file),
                 "--seq-len", "32", "--quantize", "int8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "stored bytes of the model" in printed and "matrices quantized" in printed
    model = fk.load(out)
    up = model.model.layers[0].mlp.up_proj
    assert isinstance(up, LowRankLinear) and is_quantized(up.U)
    assert json.loads((out / "factorkit.json").read_text())["compression"]["method"] == "svdllm"


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_few_tokens_run_the_compiled_int8_kernel_with_the_same_result(scheme, monkeypatch):
    torch.manual_seed(0)
    q, how = quantize_tensor(torch.randn(96, 64), scheme, 32)
    parts = int8_parts(q)
    assert parts is not None and parts[2:] == ((64 if scheme == "int8" else 32), False)  # per row / per 32
    bias = torch.randn(96)
    for tokens in (1, 3, 8, 9):  # up to INT8_MAX_TOKENS in the kernel (when built), then torchao's path
        x = torch.randn(2, tokens, 64)
        want = x.double() @ plain(q).double().T + bias.double()
        got = linear(x, q, bias)
        assert got.shape == (2, tokens, 96)
        assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()
    monkeypatch.setenv(kernels.DISABLE_ENV, "0")  # without the compiled kernels: torchao's path, same numbers
    x = torch.randn(1, 64)
    torch.testing.assert_close(linear(x, q, bias), x @ plain(q).T + bias, rtol=1e-5, atol=1e-5)
    # a rank-7 factor: int4 grouped down the columns, the kernel scales x per group of 32 rows instead
    column_grouped, how = quantize_tensor(torch.randn(64, 7), "int4", 32)
    assert how == "columns" and int8_parts(column_grouped)[2:] == (32, True)
    x = torch.randn(3, 7)
    want = x.double() @ plain(column_grouped).double().T
    assert (linear(x, column_grouped).double() - want).abs().max() <= 1e-5 * want.abs().max()


def test_quantized_linears_stay_linears_and_reload_as_such(llama, tmp_path):
    fk.quantize(llama, "int8")
    layer = llama.model.layers[0]
    assert type(layer.mlp.up_proj) is QuantizedLinear and isinstance(layer.mlp.up_proj, nn.Linear)
    assert type(llama.lm_head) is nn.Linear  # not quantized: untouched
    again = fk.load(fk.save(llama, tmp_path / "q"))
    assert type(again.model.layers[1].self_attn.o_proj) is QuantizedLinear
