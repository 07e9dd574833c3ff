"""FWSVD, Fisher information and global rank allocation, on small real tensors."""

import itertools
import math

import pytest
import torch
import transformers

import factorkit as fk
from factorkit.calibration import collect_fisher
from factorkit.surgery import linear_weight, model_targets
from factorkit.calibration.fisher import FisherStats
from factorkit.factors import LowRankLinear
from factorkit.solvers import AllocationItem, allocate, truncated_svd, weighted_svd, whitened_svd


def _rank1_weighted_optimum_brute_force(W, row=None, col=None, steps=20000):
    """min over rank-1 W' of ||diag(row) (W - W') diag(col)||_F^2 by a grid over
    the direction of the 2-dimensional side; the other factor is the exact
    weighted least-squares solution for that direction."""
    best = math.inf
    for theta in torch.linspace(0, math.pi, steps, dtype=torch.float64):
        d = torch.stack([torch.cos(theta), torch.sin(theta)])
        if row is not None:  # W is (m x 2): W' = u d^T, rows decouple, u_i = w_i . d
            approx = (W @ d)[:, None] * d[None, :]
            err = ((row[:, None] * (W - approx)) ** 2).sum()
        else:  # W is (2 x n): W' = d v^T, columns decouple, v_j = d . w_j
            approx = d[:, None] * (d @ W)[None, :]
            err = (((W - approx) * col[None, :]) ** 2).sum()
        best = min(best, float(err))
    return best


@pytest.mark.parametrize("axis", ["row", "col"])
def test_weighted_truncation_minimises_the_weighted_error(axis):
    torch.manual_seed(0)
    if axis == "row":
        W, scale = torch.randn(5, 2, dtype=torch.float64), torch.rand(5, dtype=torch.float64) * 3 + 0.1
        f = weighted_svd(W, 1, row_scale=scale)
        err = float(((scale[:, None] * (W - f.U @ f.V)) ** 2).sum())
        plain = truncated_svd(W, 1)
        plain_err = float(((scale[:, None] * (W - plain.U @ plain.V)) ** 2).sum())
        brute = _rank1_weighted_optimum_brute_force(W, row=scale)
    else:
        W, scale = torch.randn(2, 5, dtype=torch.float64), torch.rand(5, dtype=torch.float64) * 3 + 0.1
        f = weighted_svd(W, 1, column_scale=scale)
        err = float((((W - f.U @ f.V) * scale) ** 2).sum())
        plain = truncated_svd(W, 1)
        plain_err = float((((W - plain.U @ plain.V) * scale) ** 2).sum())
        brute = _rank1_weighted_optimum_brute_force(W, col=scale)
    assert err <= brute * (1 + 1e-6)  # nothing on a fine grid does better
    assert err == pytest.approx(brute, rel=1e-4)  # and the grid's best is the same optimum
    assert err == pytest.approx(float(f.discarded_energy()), rel=1e-9)  # error = discarded weighted spectrum
    assert err < plain_err  # ignoring the weights costs weighted error


def test_uniform_fisher_gives_plain_svd_exactly():
    torch.manual_seed(1)
    W = torch.randn(12, 9, dtype=torch.float64)
    plain = truncated_svd(W, 4)
    for kw in ({"row_scale": torch.full((12,), 0.37, dtype=torch.float64)},
               {"column_scale": torch.full((9,), 5.0, dtype=torch.float64)}):
        f = weighted_svd(W, 4, **kw)
        assert torch.allclose(f.U @ f.V, plain.U @ plain.V, atol=1e-12, rtol=0)


def test_uniform_fisher_fwsvd_equals_svd_on_a_model(llama):
    """Method level: FWSVD with constant Fisher rebuilds exactly what SVD builds."""
    names = model_targets(llama)
    fisher = {n: FisherStats(torch.full((linear_weight(m).shape[0],), 2.0), torch.full((linear_weight(m).shape[1],), 3.0),
                             1.0, 1) for n, m in names.items()}
    svd = _fresh(llama)
    fk.compress(svd, fk.SVDConfig(ratio=0.4), progress=False)
    for axis in ("in", "out"):
        fw = _fresh(llama)
        fk.compress(fw, fk.FWSVDConfig(ratio=0.4, fisher=fisher, fisher_axis=axis), progress=False)
        for name in names:
            wa, wb = fw.get_submodule(name).dense_weight(), svd.get_submodule(name).dense_weight()
            assert torch.allclose(wa, wb, atol=1e-6, rtol=0), name


def _fresh(model):
    copy = type(model)(model.config).eval()
    copy.load_state_dict(model.state_dict())
    copy.tie_weights()
    return copy


def test_fisher_whitened_error_is_the_weighted_output_error():
    torch.manual_seed(2)
    W, X = torch.randn(10, 8, dtype=torch.float64), torch.randn(200, 8, dtype=torch.float64)
    a = torch.rand(10, dtype=torch.float64) + 0.2
    f = whitened_svd(W, X.T @ X, 3, row_scale=a)
    err = float(((a[:, None] * ((W - f.U @ f.V) @ X.T)) ** 2).sum())
    assert err == pytest.approx(f.discarded_energy(), rel=1e-8)
    # and it beats SVD-LLM (unweighted) on that weighted objective
    g = whitened_svd(W, X.T @ X, 3)
    assert err < float(((a[:, None] * ((W - g.U @ g.V) @ X.T)) ** 2).sum())


def _brute_force_fisher(model, batches):
    """Per-sample squared gradients, one backward per sample."""
    rows = {}
    for kwargs in batches:
        for i in range(next(iter(kwargs.values())).shape[0]):
            one = {k: v[i : i + 1] for k, v in kwargs.items()}
            model.zero_grad()
            model(**one).loss.backward()
            for name, m in model_targets(model).items():
                sq = linear_weight(m).grad.detach().double() ** 2
                r, c = rows.get(name, (0, 0))
                rows[name] = (r + sq.sum(1), c + sq.sum(0))
    n = sum(next(iter(k.values())).shape[0] for k in batches)
    return {name: (r / n, c / n) for name, (r, c) in rows.items()}


def test_fisher_is_the_mean_of_per_sample_squared_gradients(llama, calib):
    data = calib[:6]
    ours = collect_fisher(llama, data, batch_size=3, progress=False)
    expected = _brute_force_fisher(llama, [{"input_ids": b, "labels": b} for b in data.split(3)])
    for name, (rows, cols) in expected.items():
        assert torch.allclose(ours[name].rows, rows, rtol=1e-4, atol=1e-12), name
        assert torch.allclose(ours[name].cols, cols, rtol=1e-4, atol=1e-12), name
    # not the square of the averaged gradient, which is much smaller
    llama.zero_grad()
    llama(input_ids=data, labels=data).loss.backward()
    name = next(iter(expected))
    assert float((linear_weight(llama.get_submodule(name)).grad ** 2).sum()) < 0.5 * ours[name].total
    assert all(p.requires_grad for p in llama.parameters())  # left as it was found


def _tiny_bert_classifier():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64, num_labels=3)
    return transformers.BertForSequenceClassification(config).eval()


def test_fisher_from_a_classifier_task_loss_and_fwsvd_compresses_it():
    model = _tiny_bert_classifier()
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 100, (4, 12), generator=g),
                "attention_mask": torch.ones(4, 12, dtype=torch.long),
                "labels": torch.randint(0, 3, (4,), generator=g)} for _ in range(2)]
    ours = collect_fisher(model, batches, progress=False)
    expected = _brute_force_fisher(model, batches)
    for name, (rows, cols) in expected.items():
        assert torch.allclose(ours[name].rows, rows, rtol=1e-4, atol=1e-12), name
    before = model(**batches[0]).logits
    fk.compress(model, fk.FWSVDConfig(ratio=0.2), batches, progress=False)
    assert fk.summarize(model).ratio_targeted >= 0.2
    assert model(**batches[0]).logits.shape == before.shape


def test_allocator_meets_the_budget_exactly():
    torch.manual_seed(3)
    items = []
    for m, n in [(30, 20), (64, 16), (8, 40), (25, 25)]:
        s = torch.linalg.svdvals(torch.randn(m, n)) ** 2
        items.append(AllocationItem.uniform(m + n, s, min_units=2))
    for budget in [456, 1234, 2500, 3001]:
        units = allocate(items, budget)
        spent = sum(u * it.costs[0].item() for u, it in zip(units, items))
        assert spent <= budget
        assert all(u >= 2 for u in units)
        # nothing more fits: every item is at its maximum or its next unit costs more than what is left
        assert all(u == it.max_units or it.costs[0].item() > budget - spent for u, it in zip(units, items))


def test_allocator_matches_exhaustive_search():
    torch.manual_seed(4)
    items = [AllocationItem.uniform(c, torch.sort(torch.rand(5), descending=True).values, 0) for c in (3, 4, 5)]
    budget = 31
    best = max((sum(float(it.gains[:u].sum()) for u, it in zip(us, items)), us)
               for us in itertools.product(range(6), repeat=3)
               if sum(u * int(it.costs[0]) for u, it in zip(us, items)) <= budget)
    units = allocate(items, budget)
    gain = sum(float(it.gains[:u].sum()) for u, it in zip(units, items))
    # greedy by gain per parameter is optimal up to the last unit that does not fit
    assert gain >= best[0] - max(float(it.gains.max()) for it in items)


def test_allocator_takes_rank_from_the_matrix_whose_spectrum_decays_fastest():
    k = torch.arange(32, dtype=torch.float64)
    fast, slow = torch.exp(-k / 2), torch.exp(-k / 16)
    fast, slow = fast / fast.square().sum().sqrt(), slow / slow.square().sum().sqrt()  # same energy
    items = [AllocationItem.uniform(64, fast.square(), 1), AllocationItem.uniform(64, slow.square(), 1)]
    units = allocate(items, 64 * 32)  # what uniform rank 16 each would cost
    assert units[0] < 16 < units[1] and sum(units) == 32

    def dropped(u):
        return float(fast.square()[u[0]:].sum() + slow.square()[u[1]:].sum())

    assert dropped(units) < dropped([16, 16])


def test_allocator_refuses_a_budget_below_the_minimum():
    with pytest.raises(ValueError, match="more than the budget"):
        allocate([AllocationItem.uniform(10, torch.ones(5), 3)], 29)


def test_global_allocation_on_a_model_spends_the_budget_and_beats_uniform_prediction(llama, calib, tmp_path):
    cfg = fk.SVDLLMConfig(ratio=0.3, allocation="global", min_rank=1)
    profile = fk.rank_profile(llama, cfg, calib, progress=False)
    ranks = profile.ranks(0.3, min_rank=1)
    uniform = profile.uniform_ranks(0.3)
    assert ranks != uniform
    assert profile.params(ranks) <= math.floor(0.7 * profile.dense_params)
    assert profile.predicted_loss(ranks) < profile.predicted_loss(uniform)

    model = _fresh(llama)
    fk.compress(model, fk.SVDLLMConfig(ratio=0.3, ranks=ranks), calib, progress=False)
    summary = fk.summarize(model)
    assert summary.ratio_targeted >= 0.3
    for name, m in model_targets(model).items():
        if isinstance(m, LowRankLinear):
            assert m.rank == ranks[name]
        else:  # kept dense: the factors would have stored as much
            assert ranks[name] * sum(m.weight.shape) >= m.weight.numel()
    fk.save(model, tmp_path / "global")
    again = fk.load(tmp_path / "global")
    ids = calib[:2]
    assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)
    assert fk.summarize(again).as_dict() == summary.as_dict()


def test_a_rank_as_large_as_the_dense_matrix_keeps_it_dense_and_counts_it(llama, calib, tmp_path):
    names = model_targets(llama)
    ranks = {n: 2 for n in names}
    dense_name = next(n for n in names if n.endswith("v_proj"))
    m, n = linear_weight(names[dense_name]).shape
    ranks[dense_name] = -(-m * n // (m + n))  # factors would store at least m*n numbers
    model = _fresh(llama)
    fk.compress(model, fk.SVDConfig(ratio=0.5, ranks=ranks), progress=False)
    assert isinstance(model.get_submodule(dense_name), torch.nn.Linear)
    summary = fk.summarize(model)
    expected = sum(linear_weight(x).numel() for x in names.values())
    assert summary.targeted_dense_params == expected
    assert summary.targeted_params == m * n + sum(2 * sum(linear_weight(names[k]).shape) for k in names if k != dense_name)
    fk.save(model, tmp_path / "kept")
    assert fk.summarize(fk.load(tmp_path / "kept")).as_dict() == summary.as_dict()


def test_bad_fwsvd_and_allocation_settings_raise_one_clear_error(llama, calib):
    with pytest.raises(fk.FactorkitError, match="fisher_axis must be out when whiten is on"):
        fk.compress(_fresh(llama), fk.FWSVDConfig(whiten=True, fisher_axis="in"), calib, progress=False)
    with pytest.raises(fk.FactorkitError, match="fisher_axis must be one of in, out, got 'rows'"):
        fk.compress(_fresh(llama), fk.FWSVDConfig(fisher_axis="rows"), calib, progress=False)
    with pytest.raises(fk.FactorkitError, match="allocation must be one of uniform, global, got 'best'"):
        fk.compress(_fresh(llama), fk.SVDLLMConfig(allocation="best"), calib, progress=False)
    with pytest.raises(fk.FactorkitError, match="needs calibration"):
        fk.compress(_fresh(llama), fk.SVDConfig(allocation="global"), None, progress=False)
    with pytest.raises(fk.FactorkitError, match="ranks has no entry"):
        fk.compress(_fresh(llama), fk.SVDConfig(ranks={"model.layers.0.self_attn.q_proj": 2}), progress=False)
    with pytest.raises(fk.FactorkitError, match="labelled batches"):
        fk.compress(_fresh(llama), fk.FWSVDConfig(), [{"input_ids": calib[:2]}], progress=False)


def test_a_budget_met_exactly_reads_exactly_the_ratio():
    """1 - kept / dense rounds 0.2 down to 0.19999999999999996 for SmolLM2's global ranks at 0.2; the summary
    divides the removed count once, so ``ratio_targeted >= ratio`` holds when the budget is met exactly."""
    from factorkit.api import CompressionSummary

    s = CompressionSummary(factor_modules=1, targeted_dense_params=106168320, targeted_params=84934656,
                           model_params_before=134515008, model_params_after=113281344, targeted_index_bits=0,
                           value_bits=32)
    assert 1 - 84934656 / 106168320 < 0.2  # the old form
    assert s.ratio_targeted == 0.2 and s.ratio_targeted_storage == 0.2
