"""The CUDA paths: the same solvers and modules on a GPU give what they give on the CPU.

Skipped where torch sees no GPU (CI); run them on a GPU machine with
``pytest tests/test_cuda.py``.
"""

import pytest
import torch

import factorkit as fk
from factorkit.factors import DictionaryLinear
from factorkit.solvers.dictionary import batch_omp, codes_to_dense, learn_dictionary

from conftest import with_train, tiny_llama

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


def test_batch_omp_on_the_gpu_picks_the_cpu_supports():
    gen = torch.Generator().manual_seed(0)
    n, k, B, s = 96, 128, 500, 40
    D = torch.randn(k, n, generator=gen, dtype=torch.float64)
    D /= D.norm(dim=1, keepdim=True)
    Y = torch.randn(B, n, generator=gen, dtype=torch.float64)
    idx, val = batch_omp(D @ D.T, Y @ D.T, s)
    Dg, Yg = D.to(CUDA), Y.to(CUDA)
    idx_g, val_g = batch_omp(Dg @ Dg.T, Yg @ Dg.T, s)  # one chunk of all 500 signals on the GPU
    assert idx_g.device.type == "cuda"
    assert torch.equal(idx_g.cpu(), idx)
    assert torch.allclose(val_g.cpu(), val, atol=1e-9)


def test_learn_dictionary_on_the_gpu_matches_the_cpu_objective():
    gen = torch.Generator().manual_seed(1)
    Y = torch.randn(64, 200, generator=gen, dtype=torch.float64)
    cpu = learn_dictionary(Y, 48, 12, 8, refresh="doubling", seed=3, dtype=torch.float64)
    gpu = learn_dictionary(Y.to(CUDA), 48, 12, 8, refresh="doubling", seed=3, dtype=torch.float64)
    assert gpu.dictionary.device.type == "cuda"
    assert all(b <= a + 1e-12 for a, b in zip(gpu.errors, gpu.errors[1:]))  # still monotone
    # Same start (seeded on the CPU). Not the same trajectory: a signal that starts as an atom is fitted
    # exactly by it, and OMP's further picks for it are ties at rounding level that each device breaks its way.
    assert gpu.errors[0] == pytest.approx(cpu.errors[0], rel=0.01)
    assert gpu.errors[-1] == pytest.approx(cpu.errors[-1], rel=0.01)
    fit = codes_to_dense(gpu.indices, gpu.values, 48)
    assert float((Y.to(CUDA) - gpu.dictionary @ fit).norm() / Y.norm()) == pytest.approx(gpu.errors[-1], rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dictionary_linear_kernels_agree_on_the_gpu(dtype):
    gen = torch.Generator().manual_seed(2)
    k, n, out, s = 64, 48, 80, 16
    idx = torch.stack([torch.randperm(k, generator=gen)[:s] for _ in range(out)])
    val, atoms, bias = torch.randn(out, s, generator=gen), torch.randn(k, n, generator=gen), torch.randn(out, generator=gen)
    W = codes_to_dense(idx, val, k).T @ atoms
    module = DictionaryLinear.from_codes(atoms.to(CUDA), idx.to(CUDA), val.to(CUDA), bias.to(CUDA), dtype=dtype)
    assert module.pick_kernel(1) == "gather" and module.pick_kernel(64) == "codes"
    tol = dict(atol=1e-3, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.5, rtol=0.05)
    for tokens in (1, 300):
        x = torch.randn(tokens, n, generator=gen)
        want = x @ W.T + bias
        for kernel in ("gather", "sparse", "codes", "dense"):
            module.kernel = kernel
            got = module(x.to(CUDA, dtype))
            assert got.device.type == "cuda" and got.dtype == dtype
            assert torch.allclose(got.float().cpu(), want, **tol), (kernel, tokens)


@pytest.mark.parametrize("config", [fk.CoSpaDiConfig(ratio=0.3, iterations=3), fk.SVDLLMConfig(ratio=0.3)],
                         ids=["cospadi", "svdllm"])
def test_compress_on_the_gpu_saves_and_reloads_identically(config, calib, tmp_path):
    model = tiny_llama(layers=2, hidden=32).to(CUDA)
    fk.compress(model, config, calib.to(CUDA), progress=False)
    assert all(p.device.type == "cuda" for p in model.parameters())
    fk.save(model, tmp_path / "m")
    again = fk.load(tmp_path / "m").to(CUDA)
    ids = calib[:2].to(CUDA)
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)


def test_dense_sparse_trains_on_the_gpu_and_its_2_4_export_runs_semi_structured():
    from factorkit.factors import DenseSparseLinear

    gen = torch.Generator().manual_seed(3)
    k, out, n = 64, 128, 128  # the smallest shapes the semi-structured kernels take
    layer = DenseSparseLinear.from_factors(torch.randn(out, k, generator=gen), torch.randn(k, n, generator=gen) / 8,
                                           k // 2, pattern="2:4").to(CUDA)
    x = torch.randn(64, n, generator=gen).to(CUDA)
    target = torch.randn(64, out, generator=gen).to(CUDA)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        loss = (layer(x) - target).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    compact = layer.export().to(torch.bfloat16)
    xb = x.bfloat16()
    compact.kernel = "codes"
    want = compact(xb)
    compact.kernel = "semi24"
    got = compact(xb)
    assert torch.allclose(got.float(), want.float(), atol=0.1, rtol=0.02)
    assert torch.allclose(want.float(), layer(x).float(), atol=0.5, rtol=0.05)


def test_sparse_low_rank_on_the_gpu_matches_the_cpu_and_saves_memory():
    from factorkit.eval import peak_memory
    from factorkit.factors import SparseLowRankLinear

    torch.manual_seed(0)
    cpu = SparseLowRankLinear(256, 192, 16, 0.05, seed=4, bias=True, dtype=torch.float64)
    torch.nn.init.normal_(cpu.B)
    gpu = SparseLowRankLinear(256, 192, 16, 0.05, seed=4, bias=True, dtype=torch.float64, device=CUDA)
    gpu.load_state_dict(cpu.state_dict())
    assert torch.equal(gpu.support.cpu(), cpu.support)  # the same support on every device
    x = torch.randn(8, 256, dtype=torch.float64)
    for module, inp in ((cpu, x), (gpu, x.to(CUDA))):
        module(inp).square().sum().backward()
    for a, b in zip(cpu.parameters(), gpu.parameters()):
        torch.testing.assert_close(b.grad.cpu(), a.grad)
    # peak memory by the CUDA allocator: the dense reference holds one W per layer until backward
    peaks = {}
    for efficient in (True, False):
        stack = [SparseLowRankLinear(2048, 2048, 64, 0.03, seed=i, memory_efficient=efficient, device=CUDA)
                 for i in range(6)]
        inp = torch.randn(64, 2048, device=CUDA)

        def step():
            h = inp
            for m in stack:
                h = torch.relu(m(h))
            h.sum().backward()

        peaks[efficient] = peak_memory(step, CUDA)
        stack.clear()
    assert peaks[False] - peaks[True] >= 4 * 2048 * 2048 * 4, peaks


def test_pretrain_on_the_gpu_matches_the_cpu_loss_curve(tmp_path, monkeypatch):
    import dataclasses
    import json

    from factorkit.workflows.pretrain import PretrainConfig, pretrain

    from conftest import SAMPLE_TEXT

    monkeypatch.setenv("FACTORKIT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "t.txt").write_text(SAMPLE_TEXT)
    (tmp_path / "c.json").write_text(json.dumps({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                                 "num_attention_heads": 4, "num_key_value_heads": 2}))
    config = with_train(PretrainConfig, model=str(tmp_path / "c.json"), param="sltrain", rank=4, density=0.1,
                            text=str(tmp_path / "t.txt"), tokenizer="bpe-300", seq_len=16, batch_size=4, steps=5,
                            warmup=1, eval_every=5, eval_rows=4, device="cuda")
    gpu = pretrain(config, progress=False, measure_memory=True)
    assert next(gpu.model.parameters()).device.type == "cuda" and gpu.params["peak_step_bytes"] > 0
    cpu = pretrain(dataclasses.replace(config, device="cpu"), progress=False)
    torch.testing.assert_close(torch.tensor(gpu.losses), torch.tensor(cpu.losses), rtol=1e-3, atol=1e-3)
