"""WaRA: the wavelet transforms against PyWavelets, the adapter's algebra, and
the PEFT-shaped save / load / merge workflow."""

import pytest
import pywt
import torch

import factorkit as fk
from factorkit.factors.wara import WaRALinear
from factorkit.adapters.wara import (
    WaRAConfig,
    get_wara_model,
    load_adapter,
    merge_and_unload,
    save_adapter,
    trainable_parameters,
    wara_modules,
)
from factorkit.solvers.wavelets import dwt2, idwt2, lowrank_idwt_factors, max_levels

from conftest import with_train, tiny_llama

SMOLLM2_SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]


@pytest.mark.parametrize("shape", SMOLLM2_SHAPES)
@pytest.mark.parametrize("wavelet, levels", [("haar", 1), ("haar", 3), ("db2", 2), ("db4", 2)])
def test_dwt2_agrees_with_pywavelets_and_inverts(shape, wavelet, levels):
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(sum(shape) + levels))
    coeffs = dwt2(x, wavelet, levels)
    reference, _ = pywt.coeffs_to_array(pywt.wavedec2(x.numpy(), wavelet, mode="periodization", level=levels))
    torch.testing.assert_close(coeffs, torch.from_numpy(reference), rtol=0, atol=1e-12)
    torch.testing.assert_close(idwt2(coeffs, wavelet, levels), x, rtol=0, atol=1e-12)
    # orthogonal: the energy is the same in both domains
    torch.testing.assert_close(coeffs.norm(), x.norm(), rtol=1e-12, atol=0)


def test_transform_limits_are_explicit():
    assert max_levels((576, 192), "haar") == 6 and max_levels((576, 192), "db4") == 5
    with pytest.raises(ValueError, match="not divisible by 2\\^3"):
        dwt2(torch.randn(12, 16), "haar", 3)
    with pytest.raises(ValueError, match="not orthogonal"):
        dwt2(torch.randn(16, 16), "bior2.2", 1)


@pytest.mark.parametrize("levels", [1, 2, 3])
def test_transformed_factors_give_the_inverse_transform_and_raise_its_rank(levels):
    gen = torch.Generator().manual_seed(levels)
    B = torch.randn(192, 4, dtype=torch.float64, generator=gen)
    A = torch.randn(4, 576, dtype=torch.float64, generator=gen)
    delta = idwt2(B @ A, "db2", levels)
    Bt, At = lowrank_idwt_factors(B, A, "db2", levels)
    assert Bt.shape == (192, 4 * (2 * levels - 1)) and At.shape == (4 * (2 * levels - 1), 576)
    torch.testing.assert_close(Bt @ At, delta, rtol=0, atol=1e-12)
    # One level is separable (S_o^T C S_i keeps the rank). Every further level adds the two
    # rank-r corrections of its top-left block: rank 4 * (2 * levels - 1), multi-scale structure.
    assert int(torch.linalg.matrix_rank(delta)) == 4 * (2 * levels - 1)


def _adapted(seed=0, **kw):
    config = WaRAConfig(target_modules=("q_proj", "v_proj", "down_proj"), r=4, alpha=8.0, wavelet="db2", levels=2, **kw)
    return get_wara_model(tiny_llama(seed), config)


def test_update_is_zero_at_start_and_only_a_b_train():
    base = tiny_llama(0)
    model = _adapted(0)
    ids = torch.randint(0, 256, (2, 12))
    assert torch.equal(model(ids).logits, base(ids).logits)  # B = 0: the adapted model is the base model
    for module in wara_modules(model).values():
        assert torch.count_nonzero(module.delta_weight()) == 0
    trainable, total = trainable_parameters(model)
    assert trainable == sum(4 * (m.in_features + m.out_features) for m in wara_modules(model).values())
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        if name.endswith((".A", ".B")):
            assert p.requires_grad and p.grad is not None
        else:
            assert not p.requires_grad and p.grad is None, name
    assert any(bool(p.grad.abs().sum() > 0) for n, p in model.named_parameters() if n.endswith(".B"))


def _train_a_little(model):
    with torch.no_grad():  # a trained-looking adapter
        for m in wara_modules(model).values():
            m.B.normal_(0, 0.05)


def test_adapter_saves_loads_onto_a_fresh_base_and_merges(tmp_path):
    model = _adapted(0)
    _train_a_little(model)
    model.eval()
    ids = torch.randint(0, 256, (2, 12))
    adapted = model(ids).logits
    save_adapter(model, tmp_path / "adapter")
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    reloaded = load_adapter(tiny_llama(0), tmp_path / "adapter").eval()
    assert torch.equal(reloaded(ids).logits, adapted)  # identical logits
    # merge / unmerge on one layer: the merged weight applies the same map, unmerge restores it exactly
    layer = next(iter(wara_modules(reloaded).values()))
    before = layer.base.weight.clone()
    x = torch.randn(5, layer.in_features)
    y = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-6)
    layer.unmerge()
    assert torch.equal(layer.base.weight, before)
    merged = merge_and_unload(reloaded)
    assert not wara_modules(merged) and all(p.requires_grad for p in merged.parameters())
    torch.testing.assert_close(merged(ids).logits, adapted, rtol=1e-5, atol=1e-5)


def test_adapter_bad_input(tmp_path):
    with pytest.raises(fk.FactorkitError, match="no Linear layer"):
        get_wara_model(tiny_llama(), WaRAConfig(target_modules=("nonexistent",)))
    with pytest.raises(fk.FactorkitError, match="not divisible"):
        get_wara_model(tiny_llama(), WaRAConfig(target_modules=("q_proj",), levels=6))
    with pytest.raises(fk.FactorkitError, match="not a WaRA adapter folder"):
        load_adapter(tiny_llama(), tmp_path)
    model = _adapted(0)
    save_adapter(model, tmp_path / "a")
    with pytest.raises(fk.FactorkitError, match="does not fit this model"):
        load_adapter(tiny_llama(0, hidden=64), tmp_path / "a")
    with pytest.raises(fk.FactorkitError, match="already exists"):
        save_adapter(model, tmp_path / "a")


def test_wara_linear_rejects_non_linear():
    with pytest.raises(TypeError):
        WaRALinear(torch.nn.Conv1d(4, 4, 1), 2)


# --- fine-tuning: WaRA against PEFT's LoRA through the same loop ------------------------------

def _finetune_config(adapter, text_file, **kw):
    from factorkit.workflows.finetune import FinetuneConfig

    settings = dict(model="tiny", adapter=adapter, r=4, alpha=8.0, wavelet="db2", levels=2, text=str(text_file),
                    seq_len=16, batch_size=4, steps=20, lr=1e-2, eval_rows=4)
    settings.update(kw)
    return with_train(FinetuneConfig, **settings)


def test_wara_and_lora_train_the_same_number_of_parameters_and_learn(tokenizer, text_file):
    from factorkit.workflows.finetune import finetune

    results = {a: finetune(_finetune_config(a, text_file), progress=False, model=tiny_llama(0), tokenizer=tokenizer)
               for a in ("wara", "lora")}
    assert results["wara"].trainable == results["lora"].trainable > 0
    for result in results.values():
        assert result.perplexity_after < 0.95 * result.perplexity_before  # the held-out text is the same verse


def test_cli_finetune_saves_adapters_that_reload(capsys, model_dir, text_file, tmp_path):
    from peft import PeftModel

    from factorkit.cli import main

    args = ["-q", "finetune", "--model", str(model_dir), "--text", str(text_file), "--r", "4", "--seq-len", "16",
            "--steps", "3", "--eval-rows", "2"]
    for adapter in ("wara", "lora"):
        out = tmp_path / adapter
        code = main(args + ["--adapter", adapter, "--out", str(out)])
        stdout, err = capsys.readouterr()
        assert code == 0, err
        assert "held-out perplexity" in stdout
        base = fk.models.load(model_dir)[0]
        model = load_adapter(base, out) if adapter == "wara" else PeftModel.from_pretrained(base, out)
        assert sum(int(p.abs().sum() > 0) for n, p in model.named_parameters() if n.endswith(("B", "lora_B.default.weight"))) > 0
    code = main(args + ["--adapter", "wara", "--levels", "9", "--out", str(tmp_path / "bad")])
    _, err = capsys.readouterr()
    assert code == 2 and "not divisible" in err and not (tmp_path / "bad").exists()


# --- WaRA from PEFT itself (adapters.wara_peft) ---------------------------------------------------------------

def _peft_wara(model, **kw):
    from peft import get_peft_model

    from factorkit.adapters.wara_peft import WaRALoraConfig

    options = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], wavelet="db2", levels=2)
    return get_peft_model(model, WaRALoraConfig(**{**options, **kw}))


def test_peft_wara_is_the_same_adapter_and_round_trips_through_peft(tmp_path):
    from peft import PeftModel

    from factorkit.adapters.wara_peft import WaRALoraConfig, WaRALoraLinear

    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    peft_model = _peft_wara(tiny_llama(0))
    layers = {n: m for n, m in peft_model.named_modules() if isinstance(m, WaRALoraLinear)}
    assert len(layers) == 3 * 2
    assert torch.equal(peft_model(ids).logits, tiny_llama(0)(ids).logits)  # B = 0: the update starts at zero
    # the same parameters as factorkit's WaRALinear, and the same function once they hold the same values
    ours = _adapted(0)
    assert peft_model.get_nb_trainable_parameters()[0] == trainable_parameters(ours)[0]
    with torch.no_grad():
        for name, module in wara_modules(ours).items():
            module.B.normal_(0, 0.05)
            peft_layer = next(m for n, m in layers.items() if n.endswith(name))
            peft_layer.lora_A["default"].weight.copy_(module.A)
            peft_layer.lora_B["default"].weight.copy_(module.B)
            plain = peft_layer.scaling["default"] * module.B @ module.A  # what a plain LoRA would add
            assert not torch.allclose(peft_layer.get_delta_weight("default"), plain, atol=1e-3)
            torch.testing.assert_close(peft_layer.get_delta_weight("default"), module.delta_weight())
    adapted = peft_model(ids).logits
    torch.testing.assert_close(adapted, ours(ids).logits, rtol=1e-5, atol=1e-5)
    # only the adapter's factors get gradients
    peft_model.train()
    peft_model(input_ids=ids, labels=ids).loss.backward()
    assert {n for n, p in peft_model.named_parameters() if p.grad is not None} == {
        n for n, _ in peft_model.named_parameters() if ".lora_A." in n or ".lora_B." in n}
    peft_model.eval()
    # PEFT's own save / load, with the config class, gives identical logits on a fresh base
    peft_model.save_pretrained(tmp_path / "adapter")
    config = WaRALoraConfig.from_pretrained(tmp_path / "adapter")
    assert (config.wavelet, config.levels) == ("db2", 2)
    reloaded = PeftModel.from_pretrained(tiny_llama(0), tmp_path / "adapter", config=config)
    assert torch.equal(reloaded(ids).logits, adapted)
    # PEFT's merge: the merged plain model computes the same function
    merged = reloaded.merge_and_unload()
    assert not any(isinstance(m, WaRALoraLinear) for m in merged.modules())
    torch.testing.assert_close(merged(ids).logits, adapted, rtol=1e-5, atol=1e-5)


def test_peft_wara_bad_input(monkeypatch):
    from peft.tuners.lora.layer import LoraLayer

    from factorkit.errors import FactorkitError
    from factorkit.adapters.wara_peft import WaRALoraConfig

    with pytest.raises(FactorkitError, match="not orthogonal"):
        WaRALoraConfig(wavelet="bior2.2")
    with pytest.raises(FactorkitError, match="needs a wavelet"):
        WaRALoraConfig(wavelet="")
    with pytest.raises(FactorkitError, match="use fewer levels"):  # a 32-wide layer holds at most 3 db2 levels
        _peft_wara(tiny_llama(0), levels=4)
    with pytest.raises(FactorkitError, match="adapts nn.Linear layers"):
        _peft_wara(tiny_llama(0), target_modules=["q_proj", "embed_tokens"])
    # a peft whose LoRA layers ignore variants would silently train a plain LoRA: refused instead
    monkeypatch.delattr(LoraLayer, "lora_variants")
    with pytest.raises(FactorkitError, match="upgrade peft"):
        WaRALoraConfig()
