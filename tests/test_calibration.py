"""The block-by-block engine gives the statistics a full forward pass gives."""

import pytest
import torch
from torch import nn

from conftest import tiny_llama

import factorkit as fk
from factorkit.calibration import calibrate_blockwise
from factorkit.surgery import find_blocks, linear_weight, target_linears
from factorkit.errors import FactorkitError


def full_forward_grams(model, data):
    """Reference: hooks on every block Linear during ordinary forward passes."""
    _, blocks = find_blocks(model)
    grams, handles = {}, []
    for i, block in enumerate(blocks):
        for name, lin in target_linears(block).items():
            key = (i, name)

            def hook(mod, inp, out, key=key):
                x = inp[0].reshape(-1, inp[0].shape[-1]).double()
                grams[key] = grams.get(key, 0) + x.T @ x
            handles.append(lin.register_forward_hook(hook))
    with torch.no_grad():
        for batch in data.split(3):
            model(input_ids=batch, use_cache=False)
    for h in handles:
        h.remove()
    return grams


def record(store):
    def on_block(i, name, block, stats):
        for layer, s in stats.items():
            store[(i, layer)] = s.gram.clone()
    return on_block


@pytest.mark.parametrize("make", ["llama", "gpt2", "qwen2", "mistral"])
def test_blockwise_grams_equal_full_forward_grams(make, request, calib):
    model = request.getfixturevalue(make)
    got = {}
    calibrate_blockwise(model, calib, record(got), stats=("gram",), batch_size=3, progress=False)
    want = full_forward_grams(model, calib)
    assert got.keys() == want.keys() and len(got) > 0
    for key in want:
        assert torch.allclose(got[key], want[key], rtol=1e-5, atol=1e-6 * float(want[key].abs().max())), key


def test_sequential_calibration_sees_the_compressed_model_inputs(llama, calib):
    """With sequential=True, block i is calibrated on what the *compressed*
    blocks before it output. So the layers that read the block input directly
    (q, k, v) see exactly the final compressed model's activations."""
    seen = {}

    def on_block(i, name, block, stats):
        for layer, s in stats.items():
            seen[(i, layer)] = s.gram.clone()
        for layer, lin in target_linears(block).items():  # compress the block: rank-2 SVD
            W = linear_weight(lin).detach()
            f = fk.solvers.truncated_svd(W, 2)
            fk.surgery.replace_module(block, layer, fk.factors.LowRankLinear.from_factors(f.U, f.V, dtype=W.dtype))

    calibrate_blockwise(llama, calib, on_block, stats=("gram",), batch_size=4, progress=False)
    want = {}
    _, blocks = find_blocks(llama)
    handles = []
    for i, block in enumerate(blocks):
        for layer, mod in block.named_modules():
            if (i, layer) in seen and layer.endswith(("q_proj", "k_proj", "v_proj")):
                def hook(m, inp, out, key=(i, layer)):
                    x = inp[0].reshape(-1, inp[0].shape[-1]).double()
                    want[key] = want.get(key, 0) + x.T @ x
                handles.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        llama(input_ids=calib, use_cache=False)
    assert len(want) == 6
    for key in want:
        assert torch.allclose(seen[key], want[key], rtol=1e-5, atol=1e-6 * float(want[key].abs().max())), key
    # and the second block's Gram differs from the uncompressed model's one
    assert not torch.allclose(seen[(1, "self_attn.q_proj")], full_forward_grams(tiny_llama(), calib)[(1, "self_attn.q_proj")])


def test_abs_mean_statistic_is_mean_absolute_input(llama, calib):
    got = {}

    def on_block(i, name, block, stats):
        got[i] = stats["mlp.down_proj"].abs_mean.clone()

    captured = []
    h = llama.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: captured.append(i[0].detach()))
    with torch.no_grad():
        llama(input_ids=calib, use_cache=False)
    h.remove()
    calibrate_blockwise(llama, calib, on_block, stats=("abs_mean",), progress=False)
    want = captured[0].reshape(-1, captured[0].shape[-1]).abs().double().mean(0)
    assert torch.allclose(got[0], want, rtol=1e-5)


def test_unit_gram_counts_every_token_once_at_unit_length(llama, calib):
    got = {}

    def on_block(i, name, block, stats):
        got[i] = (stats["mlp.down_proj"].unit_gram.clone(), stats["mlp.down_proj"].gram.clone())

    captured = []
    h = llama.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: captured.append(i[0].detach()))
    with torch.no_grad():
        llama(input_ids=calib, use_cache=False)
    h.remove()
    calibrate_blockwise(llama, calib, on_block, stats=("gram", "unit_gram"), batch_size=3, progress=False)
    x = captured[0].reshape(-1, captured[0].shape[-1]).double()
    unit = x / x.norm(dim=1, keepdim=True)
    unit_gram, gram = got[0]
    assert torch.allclose(unit_gram, unit.T @ unit, rtol=1e-6, atol=1e-9)
    assert abs(float(unit_gram.trace()) - x.shape[0]) < 1e-6 * x.shape[0]  # one per token
    assert torch.allclose(gram, x.T @ x, rtol=1e-5, atol=1e-6 * float(gram.abs().max()))


def test_model_without_linear_blocks_is_refused_with_one_sentence(calib):
    class NoLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.LayerNorm(4) for _ in range(2)])

    with pytest.raises(FactorkitError, match="no list of repeated blocks containing Linear layers"):
        fk.compress(NoLinear(), fk.SVDLLMConfig(ratio=0.2), calib)
