"""CoSpaDi: Batch-OMP, K-SVD, whitening, budget, DictionaryLinear, grouped dictionaries."""

import json
import math

import pytest
import torch
from safetensors import safe_open

import factorkit as fk
import factorkit.methods.cospadi as cospadi_method
from factorkit import kernels
from factorkit.cli import main
from factorkit.factors import DictionaryLinear, factor_modules
from factorkit.models.partial import FinishedGroups
from factorkit.solvers.dictionary import (
    batch_omp,
    codes_to_dense,
    dictionary_budget,
    dictionary_cost,
    ksvd_sweep,
    learn_dictionary,
    refresh_schedule,
    sparse_dictionary,
    svd_start,
)
from factorkit.methods.auto import eigenbasis_errors

from conftest import interrupting, tiny_llama


def _unit_rows(x):
    return x / x.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_omp_recovers_a_planted_sparse_code_exactly(dtype):
    gen = torch.Generator().manual_seed(0)
    n, k, B, s = 128, 160, 300, 6
    D = _unit_rows(torch.randn(k, n, generator=gen, dtype=torch.float64))  # atoms as rows
    support = torch.stack([torch.randperm(k, generator=gen)[:s] for _ in range(B)])
    coef = (torch.rand(B, s, generator=gen, dtype=torch.float64) + 0.5) * torch.sign(torch.randn(B, s, generator=gen))
    Y = codes_to_dense(support, coef, k).T @ D  # (B, n)
    D, Y = D.to(dtype), Y.to(dtype)
    idx, val = batch_omp(D @ D.T, Y @ D.T, s, chunk=64)
    for b in range(B):
        assert set(idx[b].tolist()) == set(support[b].tolist())
    got = codes_to_dense(idx, val.double(), k)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert torch.allclose(got, codes_to_dense(support, coef, k), atol=tol)


def test_batch_omp_codes_every_signal_on_its_own_whatever_the_chunk(monkeypatch):
    # the CPU default picks the chunk from the problem's size (to stay in cache): it must not change a code
    monkeypatch.setenv(kernels.DISABLE_ENV, "0")  # the torch version (the compiled one codes one at a time)
    gen = torch.Generator().manual_seed(2)
    k, s, B = 96, 40, 77  # B not a multiple of any chunk
    D = _unit_rows(torch.randn(k, 64, generator=gen))
    Y = torch.randn(B, 64, generator=gen)
    idx, val = batch_omp(D @ D.T, Y @ D.T, s)
    for chunk in (1, 2, 4, 8, 13, 64, 200):  # 2 and 4 leave a last chunk of one signal
        other = batch_omp(D @ D.T, Y @ D.T, s, chunk=chunk)
        assert torch.equal(other[0], idx) and torch.equal(other[1], val), chunk


def _omp_both_ways(monkeypatch, *args):
    monkeypatch.setenv(kernels.DISABLE_ENV, "0")
    torch_codes = batch_omp(*args)
    monkeypatch.setenv(kernels.DISABLE_ENV, "1")
    return torch_codes, batch_omp(*args)


@pytest.mark.skipif(kernels.dictionary() is None, reason="the compiled kernels could not be built here")
def test_compiled_batch_omp_gives_the_torch_codes(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    k, n, B, s = 120, 80, 90, 50
    D = _unit_rows(torch.randn(k, n, generator=gen, dtype=torch.float64))
    D[7] = D[3]  # a repeated atom
    Y = torch.randn(B, n, generator=gen, dtype=torch.float64)
    Y[:5] = D[3] * 2.0 + D[10]  # fitted exactly by two atoms: the other picks follow rounding noise
    (idx, val), (idx_c, val_c) = _omp_both_ways(monkeypatch, D @ D.T, Y @ D.T, s)
    assert torch.equal(idx_c[5:], idx[5:])
    assert torch.allclose(val_c[5:], val[5:], atol=1e-10, rtol=0)
    # atoms dependent on those chosen keep coefficient 0 instead of blowing up; the fit stays exact
    fit = codes_to_dense(idx_c[:5], val_c[:5], k).T @ D
    assert torch.allclose(fit, Y[:5], atol=1e-10) and float(val_c[:5].abs().max()) < 3.0
    # float32: sums round differently, so compare what the codes achieve
    D32, Y32 = D.float(), Y.float()
    (idx, val), (idx_c, val_c) = _omp_both_ways(monkeypatch, D32 @ D32.T, Y32 @ D32.T, s)

    def error(i, v):
        return float((Y - codes_to_dense(i, v.double(), k).T @ D).norm() / Y.norm())

    assert abs(error(idx_c, val_c) - error(idx, val)) < 1e-5
    # every signal is coded on its own: the thread count changes no bit
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = batch_omp(D32 @ D32.T, Y32 @ D32.T, s)
        torch.set_num_threads(2)
        two = batch_omp(D32 @ D32.T, Y32 @ D32.T, s)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


@pytest.mark.skipif(kernels.dictionary() is None, reason="the compiled kernels could not be built here")
def test_compiled_ksvd_sweep_gives_the_torch_update(monkeypatch):
    gen = torch.Generator().manual_seed(4)
    B, n, k, s = 150, 48, 40, 10
    Y = torch.randn(B, n, generator=gen, dtype=torch.float64)
    D = _unit_rows(torch.randn(k, n, generator=gen, dtype=torch.float64))
    idx, val = batch_omp(D @ D.T, Y @ D.T, s)
    val[idx == 5] = 0.0  # an atom whose coefficients are all 0: kept, its coefficients refitted
    runs = {}
    for env in ("0", "1"):
        monkeypatch.setenv(kernels.DISABLE_ENV, env)
        R, A, V = Y - codes_to_dense(idx, val, k).T @ D, D.clone(), val.clone()
        for _ in range(3):
            ksvd_sweep(R, A, idx, V, power_iterations=2)
        runs[env] = (R, A, V)
    for a, b in zip(runs["0"], runs["1"]):
        assert torch.allclose(a, b, atol=1e-10, rtol=0)
    R, A, V = runs["1"]
    assert torch.allclose(R, Y - codes_to_dense(idx, V, k).T @ A, atol=1e-10)
    threads = torch.get_num_threads()  # rows and column ranges over the threads: no bit changes
    out = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            R, A, V = Y - codes_to_dense(idx, val, k).T @ D, D.clone(), val.clone()
            ksvd_sweep(R, A, idx, V)
            out.append((R, A, V))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*out))


def test_batch_omp_matches_scikit_learn():
    sklearn = pytest.importorskip("sklearn.linear_model")
    gen = torch.Generator().manual_seed(1)
    n, k, B, s = 48, 64, 80, 20  # many atoms per signal, not a recovery problem
    D = _unit_rows(torch.randn(k, n, generator=gen, dtype=torch.float64))
    Y = torch.randn(B, n, generator=gen, dtype=torch.float64)
    idx, val = batch_omp(D @ D.T, Y @ D.T, s)
    ref = torch.from_numpy(sklearn.orthogonal_mp_gram((D @ D.T).numpy(), (D @ Y.T).numpy(), n_nonzero_coefs=s))
    for b in range(B):
        assert set(idx[b].tolist()) == set(ref[:, b].nonzero().flatten().tolist())
    assert torch.allclose(codes_to_dense(idx, val, k), ref, atol=1e-8)


def test_omp_rejects_a_sparsity_above_the_number_of_atoms():
    D = torch.eye(4)
    with pytest.raises(ValueError, match="sparsity"):
        batch_omp(D, torch.ones(2, 4), 5)


def test_ksvd_sweep_never_increases_the_error_and_keeps_the_residual_exact():
    gen = torch.Generator().manual_seed(2)
    B, n, k, s = 120, 40, 30, 8
    Y = torch.randn(B, n, generator=gen, dtype=torch.float64)
    D = _unit_rows(torch.randn(k, n, generator=gen, dtype=torch.float64))
    idx, val = batch_omp(D @ D.T, Y @ D.T, s)
    residual = Y - codes_to_dense(idx, val, k).T @ D
    before = float(residual.norm())
    for power in (1, 3):
        ksvd_sweep(residual, D, idx, val, power_iterations=power)
        after = float(residual.norm())
        assert after <= before * (1 + 1e-12)
        before = after
    assert torch.allclose(residual, Y - codes_to_dense(idx, val, k).T @ D, atol=1e-10)
    assert torch.allclose(D.norm(dim=1), torch.ones(k, dtype=torch.float64))


@pytest.mark.parametrize("refresh", ["every", "doubling", 3])
def test_alternations_never_increase_the_objective(refresh):
    gen = torch.Generator().manual_seed(3)
    Y = torch.randn(50, 90, generator=gen, dtype=torch.float64) @ torch.randn(90, 90, generator=gen, dtype=torch.float64)
    fit = learn_dictionary(Y, atoms=24, sparsity=6, iterations=12, refresh=refresh, dtype=torch.float64)
    errors = fit.errors
    assert all(b <= a * (1 + 1e-9) for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.9 * errors[0]  # it learns something
    approx = fit.dictionary @ codes_to_dense(fit.indices, fit.values, 24)
    assert math.isclose(float((Y - approx).norm() / Y.norm()), errors[-1], rel_tol=1e-6)
    assert (fit.indices.sort(1).values.diff(dim=1) > 0).all()  # exactly s distinct atoms per signal


@pytest.mark.parametrize("shape,atoms,sparsity", [((30, 80), 24, 6), ((80, 30), 24, 6), ((20, 50), 30, 12)])
def test_the_refined_start_is_the_refined_estimate_and_the_fit_only_improves_on_it(shape, atoms, sparsity):
    """start="refined" starts at exactly the error --estimate refined prices an option by, never above the
    svd start's, and the alternations only improve on it."""
    from factorkit.methods.auto import refined_errors
    from factorkit.solvers.dictionary import refined_start

    gen = torch.Generator().manual_seed(6)
    n, B = shape
    Y = torch.randn(n, n, generator=gen, dtype=torch.float64) @ (
        torch.randn(n, B, generator=gen, dtype=torch.float64) * torch.logspace(0, -2, B, dtype=torch.float64))
    Yt = (Y / Y.norm()).T
    u, sv, vh = torch.linalg.svd(Yt, full_matrices=False)
    estimate = refined_errors(Yt, u, sv, vh, [(atoms, sparsity)])[0]
    assert estimate <= eigenbasis_errors(u * sv, 1.0, [(atoms, sparsity)])[0] * (1 + 1e-9)
    top, idx, val = refined_start(Yt, atoms, sparsity)
    assert torch.allclose(top.norm(dim=1), torch.ones(top.shape[0], dtype=torch.float64))
    start = Yt - codes_to_dense(idx, val, top.shape[0]).T @ top
    assert math.isclose(float(start.norm()), estimate, rel_tol=1e-9)
    fit = learn_dictionary(Y, atoms, sparsity, iterations=6, refresh="doubling", dtype=torch.float64, start="refined")
    assert fit.errors[0] <= estimate * (1 + 1e-9)
    assert all(b <= a * (1 + 1e-9) for a, b in zip(fit.errors, fit.errors[1:])), fit.errors
    approx = fit.dictionary @ codes_to_dense(fit.indices, fit.values, atoms)
    assert math.isclose(float((Y - approx).norm() / Y.norm()), fit.errors[-1], rel_tol=1e-6)


@pytest.mark.parametrize("shape,atoms,sparsity", [((30, 80), 24, 6), ((80, 30), 24, 6), ((20, 50), 30, 12)])
def test_the_svd_start_is_the_eigenbasis_estimate_and_the_fit_only_improves_on_it(shape, atoms, sparsity):
    """start="svd" starts at exactly the error methods.auto prices a dictionary option by (s largest
    coefficients in the first k singular directions), and no alternation goes above it; with more atoms
    than dimensions (third case) the extra atoms start from signals."""
    gen = torch.Generator().manual_seed(5)
    n, B = shape
    Y = torch.randn(n, B, generator=gen, dtype=torch.float64) * torch.logspace(0, -2, B, dtype=torch.float64)
    Y = torch.randn(n, n, generator=gen, dtype=torch.float64) @ Y
    U, S, _ = torch.linalg.svd(Y.T, full_matrices=False)
    estimate = eigenbasis_errors(U * S, float(S.square().sum()), [(atoms, sparsity)])[0]
    Yt = (Y / Y.norm()).T
    top, idx, val = svd_start(Yt, atoms, sparsity)
    start = Yt - codes_to_dense(idx, val, top.shape[0]).T @ top
    assert math.isclose(float(start.norm()), estimate, rel_tol=1e-9)
    fit = learn_dictionary(Y, atoms, sparsity, iterations=6, refresh="doubling", dtype=torch.float64)
    assert fit.errors[0] <= estimate * (1 + 1e-9)
    assert all(b <= a * (1 + 1e-9) for a, b in zip(fit.errors, fit.errors[1:])), fit.errors
    approx = fit.dictionary @ codes_to_dense(fit.indices, fit.values, atoms)
    assert math.isclose(float((Y - approx).norm() / Y.norm()), fit.errors[-1], rel_tol=1e-6)
    assert (fit.indices.sort(1).values.diff(dim=1) > 0).all()


def test_refresh_schedules():
    assert refresh_schedule(10, "doubling") == [i in (0, 1, 2, 4, 8, 9) for i in range(10)]
    assert refresh_schedule(7, 3) == [i in (0, 3, 6) for i in range(7)]
    assert all(refresh_schedule(5, "every"))
    with pytest.raises(ValueError):
        refresh_schedule(5, "sometimes")


def test_whitened_error_is_the_calibration_output_error():
    gen = torch.Generator().manual_seed(4)
    # activations with very unequal channel scales, as in real models
    X = torch.randn(400, 24, generator=gen, dtype=torch.float64) * torch.logspace(-1, 1, 24, dtype=torch.float64)
    W = torch.randn(36, 24, generator=gen, dtype=torch.float64)
    fit = sparse_dictionary([W], atoms=16, sparsity=5, gram=X.T @ X, iterations=10)[0]
    output_error = float((X @ W.T - X @ fit.dense().T).norm() / (X @ W.T).norm())
    assert math.isclose(fit.errors[-1], output_error, rel_tol=1e-4)
    plain = sparse_dictionary([W], atoms=16, sparsity=5, iterations=10)[0]  # fits the weights, not the outputs
    assert float((X @ W.T - X @ plain.dense().T).norm() / (X @ W.T).norm()) > output_error
    assert torch.allclose(fit.atoms.norm(dim=1), torch.ones(16, dtype=torch.float64))


def test_budget_arithmetic():
    k, s = dictionary_budget(576, 576, 0.2)  # in, out
    assert (k, s) == (307, 153)
    numbers, _ = dictionary_cost(576, 576, k, s)
    assert numbers <= 0.8 * 576 * 576 < dictionary_cost(576, 576, k + 2, (k + 2) // 2)[0]
    # storage: the support mask bits count too, at the value width
    k2, s2 = dictionary_budget(576, 1536, 0.3, count="storage", value_bits=16)
    _, bits = dictionary_cost(576, 1536, k2, s2, value_bits=16)
    assert bits <= 0.7 * 576 * 1536 * 16 < dictionary_cost(576, 1536, k2 + 2, (k2 + 2) // 2, value_bits=16)[1]
    assert k2 < dictionary_budget(576, 1536, 0.3)[0]
    # a shared dictionary is paid once: two layers get more atoms than one
    kg, sg = dictionary_budget(576, 576, 0.2, layers=2)
    assert kg > k and dictionary_cost(576, 576, kg, sg, layers=2)[0] <= 0.8 * 2 * 576 * 576
    assert dictionary_budget(100, 100, 0.5, rho=4.0) == (40, 10)  # 0.5 * 1e4 / (100 + 100/4)


def compiled_kernels() -> tuple[str, ...]:
    return kernels.usable(kernels.dictionary())


def test_dictionary_linear_kernels_agree_and_count_honestly():
    gen = torch.Generator().manual_seed(5)
    k, n, out, s = 40, 24, 30, 7
    idx = torch.stack([torch.randperm(k, generator=gen)[:s] for _ in range(out)])
    val = torch.randn(out, s, generator=gen)
    atoms = torch.randn(k, n, generator=gen)
    bias = torch.randn(out, generator=gen)
    module = DictionaryLinear.from_codes(atoms, idx, val, bias)
    W = codes_to_dense(idx, val, k).T @ atoms
    assert torch.allclose(module.dense_weight(), W, atol=1e-5)
    for tokens in (1, 5, 200):
        x = torch.randn(2, tokens, n, generator=gen)
        want = x @ W.T + bias
        for kernel in ("gather", "sparse", "codes", "dense") + compiled_kernels():
            module.kernel = kernel
            with torch.no_grad():  # the compiled kernels are forward-only
                assert torch.allclose(module(x), want, atol=1e-4), kernel
    module.kernel = "auto"
    if "mask" not in kernels.usable(kernels.dictionary()):  # not built, or a scalar build (slower than CSR)
        assert module.pick_kernel(1) == "sparse" and module.pick_kernel(2048) == "codes"
    else:  # the compiled kernels take decoding; a gradient still needs torch's
        assert module.pick_kernel(1) == "mask" and module.pick_kernel(2048) == "codes"
        assert module.pick_kernel(1, needs_grad=True) == "sparse"
        # every vector build has the lanes kernel past the mask kernel's tokens, up to its build's limit
        most = module.AVX2_LANES_MAX_TOKENS if kernels.dictionary().isa() == "avx2" else module.LANES_MAX_TOKENS
        assert [module.pick_kernel(t) for t in (module.MASK_MAX_TOKENS, module.MASK_MAX_TOKENS + 1, most, most + 1)] \
            == ["mask", "lanes", "lanes", "codes"]
    assert module.param_count() == k * n + out * s + out
    assert module.index_bits() == out * k
    assert module.support.dtype == torch.uint8 and module.support.numel() == out * math.ceil(k / 8)
    half = DictionaryLinear.from_codes(atoms, idx, val, bias, dtype=torch.bfloat16)
    x = torch.randn(3, n, generator=gen)
    # torch has no bfloat16 CSR product on CPU; the compiled kernels read bfloat16 values
    assert half.pick_kernel(3) == ("mask" if "mask" in kernels.usable(kernels.dictionary()) else "codes")
    if "lanes" in kernels.usable(kernels.dictionary()):
        most = half.AVX2_BF16_LANES_MAX_TOKENS if kernels.dictionary().isa() == "avx2" else half.LANES_MAX_TOKENS
        assert (half.pick_kernel(most), half.pick_kernel(most + 1)) == ("lanes", "codes")
    for kernel in ("gather", "sparse", "codes", "dense") + compiled_kernels():
        half.kernel = kernel
        with torch.no_grad():
            assert torch.allclose(half(x.bfloat16()).float(), x @ W.T + bias, atol=0.3, rtol=0.05), kernel


def _layer(model, i, name):
    return model.model.layers[i].get_submodule(name)


def test_cospadi_compresses_saves_and_reloads_identically(calib, tmp_path):
    model = tiny_llama(layers=2, hidden=32)
    report = fk.compress(model, fk.CoSpaDiConfig(ratio=0.3, iterations=4), calib, progress=False)
    summary = fk.summarize(model)
    assert summary == report.summary
    assert summary.factor_modules == 14 and summary.ratio_targeted >= 0.3
    assert summary.ratio_targeted_storage < summary.ratio_targeted  # the masks cost bits
    fit = report.fit
    assert all(f["error"] < 1.0 for f in fit.values())
    fk.save(model, tmp_path / "m")
    again = fk.load(tmp_path / "m")
    ids = calib[:2]
    assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)
    assert json.loads((tmp_path / "m" / "factorkit.json").read_text())["compression"]["config"]["iterations"] == 4


def test_storage_count_reaches_the_ratio_with_the_masks(calib):
    model = tiny_llama(layers=2, hidden=32)
    fk.compress(model, fk.CoSpaDiConfig(ratio=0.3, iterations=2, count="storage"), calib, progress=False)
    assert fk.summarize(model).ratio_targeted_storage >= 0.3


def test_grouped_mode_shares_one_dictionary_per_projection(calib, tmp_path):
    model = tiny_llama(layers=3, hidden=32)
    report = fk.compress(model, fk.CoSpaDiConfig(ratio=0.3, iterations=3, group=2), calib, progress=False)
    q0, q1, q2 = (_layer(model, i, "self_attn.q_proj") for i in range(3))
    assert q0.atoms is q1.atoms and q2.atoms is not q0.atoms  # layers 0-1 share; layer 2 is its own group
    assert not torch.equal(q0.values, q1.values)  # codes are per layer
    assert _layer(model, 0, "mlp.up_proj").atoms is not q0.atoms
    summary = fk.summarize(model)
    assert summary.ratio_targeted >= 0.3  # the shared dictionary is counted once
    for entry in report.fit.values():  # each layer carries its share of the one shared solve, not all of it
        assert entry["omp_s"] + entry["ksvd_s"] <= entry["seconds"]
    fk.save(model, tmp_path / "g")
    with safe_open(str(tmp_path / "g" / "model.safetensors"), "pt") as f:
        atoms_keys = [key for key in f.keys() if key.endswith("q_proj.atoms")]
    assert len(atoms_keys) == 2  # group (0, 1) stored once, layer 2 once
    again = fk.load(tmp_path / "g")
    assert _layer(again, 0, "self_attn.q_proj").atoms is _layer(again, 1, "self_attn.q_proj").atoms
    ids = calib[:2]
    assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)


def test_an_interrupted_compression_resumes_to_the_same_model(calib, tmp_path, monkeypatch):
    settings = {"ratio": 0.3, "iterations": 3, "group": 2}  # groups: blocks 0-1 (shared dictionaries), block 2
    reference = tiny_llama(layers=3, hidden=32)
    ref = fk.compress(reference, fk.CoSpaDiConfig(**settings), calib, progress=False).fit

    solve, solved = cospadi_method.sparse_dictionary, []
    folder = tmp_path / "finished"
    config = fk.CoSpaDiConfig(**settings, checkpoint_dir=str(folder))
    # 7 solves per group: stops in group 2
    monkeypatch.setattr(cospadi_method, "sparse_dictionary", interrupting(solve, solved, stop_at=9))
    with pytest.raises(KeyboardInterrupt):
        fk.compress(tiny_llama(layers=3, hidden=32), config, calib, progress=False)
    assert FinishedGroups(folder, json.loads((folder / "run.json").read_text())).finished() == ["blocks-0000-0001"]

    solved.clear()
    monkeypatch.setattr(cospadi_method, "sparse_dictionary", interrupting(solve, solved, stop_at=None))
    model = tiny_llama(layers=3, hidden=32)
    fit = fk.compress(model, config, calib, progress=False).fit
    assert len(solved) == 7  # only the unfinished group was solved again
    assert _layer(model, 0, "self_attn.q_proj").atoms is _layer(model, 1, "self_attn.q_proj").atoms
    assert fit.keys() == ref.keys() and all(fit[k]["errors"] == ref[k]["errors"] for k in ref)
    assert {k for k, v in fit.items() if v.get("restored")} == {
        k for k in ref if k.startswith(("model.layers.0.", "model.layers.1."))}
    ids = calib[:2]
    assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    assert "checkpoint_dir" not in fk.compression_record(model)["config"]

    with pytest.raises(fk.FactorkitError, match="another run"):
        fk.compress(tiny_llama(layers=3, hidden=32), fk.CoSpaDiConfig(**{**settings, "iterations": 2},
                    checkpoint_dir=str(folder)), calib, progress=False)
    with pytest.raises(fk.FactorkitError, match="another run"):
        fk.compress(tiny_llama(seed=1, layers=3, hidden=32), config, calib, progress=False)


def test_without_whitening_no_data_is_needed():
    model = tiny_llama()
    fk.compress(model, fk.CoSpaDiConfig(ratio=0.3, iterations=2, whiten=False), None, progress=False)
    assert fk.summarize(model).factor_modules == 14


@pytest.mark.parametrize("options, message", [
    ({"rho": 0.5}, "rho"),
    ({"count": "bits"}, "count"),
    ({"refresh": "sometimes"}, "refresh"),
    ({"iterations": 0}, "iterations"),
    ({"ratio": 0.999}, "fewer than one nonzero"),
])
def test_bad_cospadi_settings_raise_one_clear_error(calib, options, message):
    with pytest.raises(fk.FactorkitError, match=message):
        fk.compress(tiny_llama(), fk.CoSpaDiConfig(**{"iterations": 2, **options}), calib, progress=False)


def test_cospadi_from_the_command_line(capsys, model_dir, tmp_path):
    out_dir = tmp_path / "out"
    capsys.readouterr()
    code = main(["-q", "compress", "--model", str(model_dir), "--method", "cospadi", "--ratio", "0.3",
                 "--iterations", "3", "--group", "2", "--calib-samples", "4", "--calib-seq-len", "32",
                 "--checkpoint-dir", str(tmp_path / "finished"), "--out", str(out_dir)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "support masks" in out
    model = fk.load(out_dir)
    assert {type(m) for _, m in factor_modules(model)} == {DictionaryLinear}
    assert fk.compression_record(model)["config"]["group"] == 2
    assert sorted(p.name for p in (tmp_path / "finished").glob("*.json")) == ["blocks-0000-0001.json", "run.json"]
    code = main(["-q", "compress", "--model", str(model_dir), "--method", "svdllm", "--group", "2",
                 "--out", str(tmp_path / "bad")])
    assert code == 2 and "--group applies to --method cospadi only" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
