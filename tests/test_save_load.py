"""Saving writes a folder that reloads to identical logits, and never half a folder."""

import json

import pytest
import torch

import factorkit as fk
from factorkit.errors import FactorkitError
from factorkit.factors import LowRankLinear


@pytest.mark.parametrize("config", [fk.SVDConfig(ratio=0.3), fk.ASVDConfig(ratio=0.3), fk.SVDLLMConfig(ratio=0.3)],
                         ids=lambda c: c.method)
def test_compressed_model_reloads_to_identical_logits(llama, calib, tmp_path, tokenizer, config):
    fk.compress(llama, config, calib, progress=False)
    before = llama(input_ids=calib[:2]).logits
    fk.save(llama, tmp_path / "out", tokenizer=tokenizer)
    again = fk.load(tmp_path / "out")
    assert torch.equal(again(input_ids=calib[:2]).logits, before)
    manifest = json.loads((tmp_path / "out" / "factorkit.json").read_text())
    assert manifest["compression"]["method"] == config.method
    assert len(manifest["modules"]) == 2 * 7  # 2 blocks x (q, k, v, o, gate, up, down)
    assert all(isinstance(m, LowRankLinear) for m in [again.model.layers[0].self_attn.q_proj, again.model.layers[1].mlp.down_proj])
    # tied embeddings stay tied
    assert again.lm_head.weight.data_ptr() == again.model.embed_tokens.weight.data_ptr()
    # and the model loader reads the same folder with its tokenizer
    model, tok = fk.models.load(tmp_path / "out")
    assert tok is not None and torch.equal(model(input_ids=calib[:2]).logits, before)


def test_qwen2_biases_survive_compression_and_reload(qwen2, calib, tmp_path):
    q_bias = qwen2.model.layers[0].self_attn.q_proj.bias.detach().clone()
    fk.compress(qwen2, fk.SVDLLMConfig(ratio=0.25), calib, progress=False)
    q = qwen2.model.layers[0].self_attn.q_proj
    assert isinstance(q, LowRankLinear) and torch.equal(q.bias.detach(), q_bias)
    before = qwen2(input_ids=calib[:2]).logits
    fk.save(qwen2, tmp_path / "qwen2")
    assert torch.equal(fk.load(tmp_path / "qwen2")(input_ids=calib[:2]).logits, before)


def test_gpt2_conv1d_layers_are_compressed_and_reload(gpt2, calib, tmp_path):
    fk.compress(gpt2, fk.SVDLLMConfig(ratio=0.25), calib, progress=False)
    assert isinstance(gpt2.transformer.h[0].attn.c_attn, LowRankLinear)
    before = gpt2(input_ids=calib[:2]).logits
    fk.save(gpt2, tmp_path / "gpt2")
    assert torch.equal(fk.load(tmp_path / "gpt2")(input_ids=calib[:2]).logits, before)


def test_summary_counts_ratio_of_targeted_and_whole_model(llama, calib):
    total_before = sum(p.numel() for p in llama.parameters())
    fk.compress(llama, fk.SVDConfig(ratio=0.4), calib, progress=False)
    s = fk.summarize(llama)
    assert s.model_params_before == total_before
    assert s.model_params_after == sum(p.numel() for p in llama.parameters())
    assert 0.4 <= s.ratio_targeted < 0.45  # floor of the rank removes a little more than asked
    assert 0 < s.ratio_model < s.ratio_targeted  # embeddings are not compressed


def test_interrupted_save_leaves_nothing(llama, tmp_path, monkeypatch):
    import factorkit.models.checkpoint as ckpt

    def broken(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(ckpt, "save_model", broken)
    with pytest.raises(KeyboardInterrupt):
        fk.save(llama, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_to_overwrite_unless_asked(llama, tmp_path):
    fk.save(llama, tmp_path / "out")
    with pytest.raises(FactorkitError, match="already exists"):
        fk.save(llama, tmp_path / "out")
    (tmp_path / "out" / "stale.txt").write_text("from the first save")
    fk.save(llama, tmp_path / "out", overwrite=True)  # a folder factorkit wrote is replaced whole
    assert not (tmp_path / "out" / "stale.txt").exists() and (tmp_path / "out" / "factorkit.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_overwrite_never_replaces_a_folder_factorkit_did_not_write(llama, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FactorkitError, match="did not write"):
        fk.save(llama, tmp_path / "out", overwrite=True)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_compressing_twice_is_refused(llama, calib):
    fk.compress(llama, fk.SVDConfig(ratio=0.2), calib, progress=False)
    with pytest.raises(FactorkitError, match="already compressed"):
        fk.compress(llama, fk.SVDConfig(ratio=0.2), calib, progress=False)


def test_unmatched_targets_name_the_available_layers(llama, calib):
    with pytest.raises(FactorkitError, match="q_proj"):
        fk.compress(llama, fk.SVDConfig(ratio=0.2, targets=("nonexistent",)), calib, progress=False)


def test_targets_restrict_what_is_compressed(llama, calib):
    fk.compress(llama, fk.SVDLLMConfig(ratio=0.2, targets=("q_proj", "down_proj")), calib, progress=False)
    layer = llama.model.layers[1]
    assert isinstance(layer.self_attn.q_proj, LowRankLinear) and isinstance(layer.mlp.down_proj, LowRankLinear)
    assert isinstance(layer.self_attn.k_proj, torch.nn.Linear)


@pytest.mark.parametrize("ratio", [0.0, 1.0, 1.5, -0.2])
def test_ratio_outside_unit_interval_is_refused(llama, calib, ratio):
    with pytest.raises(FactorkitError, match=r"\(0, 1\)"):
        fk.compress(llama, fk.SVDConfig(ratio=ratio), calib, progress=False)


def test_data_aware_method_without_data_is_refused(llama):
    with pytest.raises(FactorkitError, match="needs calibration tokens"):
        fk.compress(llama, fk.SVDLLMConfig(ratio=0.2), None, progress=False)


def test_dense_model_round_trips_too(llama, calib, tmp_path):
    before = llama(input_ids=calib[:2]).logits
    fk.save(llama, tmp_path / "dense")
    again = fk.load(tmp_path / "dense")
    assert torch.equal(again(input_ids=calib[:2]).logits, before)
    assert fk.summarize(again).factor_modules == 0


def test_bfloat16_model_keeps_its_dtype_through_save_and_load(model_dir, calib, tmp_path):
    # loaded the Hugging Face way (rotary tables stay float32), not cast with .to()
    llama, _ = fk.models.load(model_dir, dtype=torch.bfloat16)
    fk.compress(llama, fk.SVDLLMConfig(ratio=0.3), calib, progress=False)
    assert llama.model.layers[0].mlp.up_proj.U.dtype == torch.bfloat16
    before = llama(input_ids=calib[:2]).logits
    fk.save(llama, tmp_path / "bf16")
    again = fk.load(tmp_path / "bf16")
    assert next(again.parameters()).dtype == torch.bfloat16
    assert torch.equal(again(input_ids=calib[:2]).logits, before)


def test_damaged_folder_is_reported_not_half_loaded(llama, tmp_path):
    fk.compress(llama, fk.SVDConfig(ratio=0.3), None, progress=False)
    fk.save(llama, tmp_path / "m")
    manifest = json.loads((tmp_path / "m" / "factorkit.json").read_text())
    manifest["modules"].pop("model.layers.0.mlp.up_proj")  # the json no longer matches the weights
    (tmp_path / "m" / "factorkit.json").write_text(json.dumps(manifest))
    with pytest.raises(FactorkitError, match="damaged"):
        fk.load(tmp_path / "m")
