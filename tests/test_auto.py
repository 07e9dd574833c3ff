"""One byte budget over the model: menus of dense / low-rank / dictionary options, the knapsack's pick,
mixed models that save and reload, CoSpaDi with global allocation."""

import pytest
import torch

import factorkit as fk
from factorkit.cli import main
from factorkit.factors import DictionaryLinear, FactorModule, LowRankLinear
from factorkit.methods.auto import dictionary_bytes, eigenbasis_errors, lowrank_options, pricing_weights
from factorkit.solvers.whitening import cholesky_factor
from factorkit.surgery import linear_weight, model_targets

from conftest import interrupting, tiny_llama


def stored_bytes(model, names) -> int:
    """What the targeted matrices store now, counted from the modules themselves (biases aside)."""
    total = 0
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, LowRankLinear):
            total += sum(p.numel() * p.element_size() for n, p in module.named_parameters() if n != "bias")
        elif isinstance(module, DictionaryLinear):
            total += (module.atoms.numel() + module.values.numel()) * module.values.element_size()
            total += module.support.numel()  # uint8 mask
        else:
            total += linear_weight(module).numel() * linear_weight(module).element_size()
    return total


@pytest.fixture
def data():
    return torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("ratio", [0.2, 0.4, 0.6])
def test_auto_stays_within_the_byte_budget_and_mixes_types(ratio, data):
    model = tiny_llama(seed=1, hidden=64)
    names = list(model_targets(model, None))
    dense = stored_bytes(model, names)
    report = fk.compress(model, fk.AutoConfig(ratio=ratio, iterations=2), data, progress=False)
    fit = report.fit
    assert fit["dense_bytes"] == dense
    assert stored_bytes(model, names) == fit["bytes"] <= fit["budget_bytes"] <= (1 - ratio) * dense
    assert sum(t["matrices"] for t in fit["types"].values()) == len(names)
    assert sum(t["bytes"] for t in fit["types"].values()) == fit["bytes"]
    assert fit["types"]["lowrank"]["matrices"] > 0 and fit["types"]["dictionary"]["matrices"] > 0  # mixed
    assert fit["optimality_gap"] >= 0 and all(k in fit for k in ("fisher_s", "profile_s", "knapsack_s", "solve_s"))
    kinds = {n: type(model.get_submodule(n)) for n in names}
    # no low-rank pick removes more of its matrix than the dictionaries may (the default cap, 0.7)
    assert all(c["bytes"] >= 0.3 * c["dense_bytes"] for c in fit["choice"].values() if c["type"] == "lowrank")
    for name, choice in fit["choice"].items():
        expected = {"dense": torch.nn.Linear, "lowrank": LowRankLinear, "dictionary": DictionaryLinear}[choice["type"]]
        assert kinds[name] is expected


def test_a_mixed_model_saves_and_reloads_to_identical_logits(data, tmp_path):
    model = tiny_llama(seed=2, hidden=64)
    report = fk.compress(model, fk.AutoConfig(ratio=0.4, iterations=2, estimate="probe", probe_iterations=1), data, progress=False)
    assert len(report.fit["types"]) >= 2  # at least two kinds side by side in one model
    fk.save(model, tmp_path / "mixed")
    back = fk.load(tmp_path / "mixed")
    with torch.no_grad():
        assert torch.equal(model(data[:2]).logits, back(data[:2]).logits)
    assert [type(m) for m in back.modules() if isinstance(m, FactorModule)] == \
        [type(m) for m in model.modules() if isinstance(m, FactorModule)]


def test_lowrank_menu_prices_ranks_by_the_discarded_whitened_energy():
    spectrum = torch.tensor([9.0, 4.0, 1.0, 0.25])
    options = lowrank_options(6, 4, spectrum, sensitivity=2.0, count=100, value_bytes=4)
    assert [o.size[0] for o in options] == [1, 2]  # rank 3 would store 30 numbers >= 24 dense
    assert [o.loss for o in options] == [2.0 * 5.25, 2.0 * 1.25]
    assert [o.bytes for o in options] == [40, 80]
    assert dictionary_bytes(1536, 576, 300, 150, 2) == (300 * 576 + 1536 * 150) * 2 + 1536 * 38


def test_the_lowrank_menu_stops_at_the_largest_removal_allowed():
    spectrum = torch.linspace(10.0, 0.1, 64).square()
    every = lowrank_options(96, 64, spectrum, sensitivity=1.0, count=48, value_bytes=2)
    capped = lowrank_options(96, 64, spectrum, sensitivity=1.0, count=48, value_bytes=2, max_removal=0.7)
    dense = 96 * 64 * 2
    assert min(o.bytes for o in every) < 0.3 * dense  # the grid reaches deeper than the cap
    assert capped and all(o.bytes >= 0.3 * dense for o in capped)
    assert capped == [o for o in every if o.bytes >= 0.3 * dense]  # the same ranks and prices, cut at the cap
    # the smallest rank at the cap itself: r (m + n) >= 0.3 m n, r = ceil(0.3 * 96 * 64 / 160) = 12 when on the grid
    assert all(o.size[0] >= 12 for o in capped)


def _tokens(massive: bool) -> torch.Tensor:
    """300 calibration inputs of 12 channels, every one of norm 3; with ``massive`` one more of norm 3000 (an
    activation such as a first token's), along a direction of its own."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 12, generator=g, dtype=torch.float64)
    x = 3.0 * x / x.norm(dim=1, keepdim=True)
    if massive:
        x = torch.cat([x, 3000.0 * torch.eye(12, dtype=torch.float64)[:1]])
    return x


def _unit_gram(x: torch.Tensor) -> torch.Tensor:
    unit = x / x.norm(dim=1, keepdim=True)
    return unit.T @ unit


def test_the_unit_metric_prices_as_the_gram_when_every_token_has_one_norm():
    """Every input of norm 3: the unit-length Gram is X^T X / 9, so each direction's weight is 1/9 and the
    relative error of every option is the Gram metric's."""
    x = _tokens(massive=False)
    w = torch.randn(8, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    factor = cholesky_factor(x.T @ x).factor
    u, sv, vh = torch.linalg.svd(w @ factor, full_matrices=False)
    weights = pricing_weights(factor, _unit_gram(x), vh)
    assert torch.allclose(weights, torch.full_like(weights, 1 / 9), rtol=1e-9)
    sizes = [(4, 2), (6, 3), (8, 2)]
    assert eigenbasis_errors(u * sv, 0.0, sizes, weights) == pytest.approx(
        eigenbasis_errors(u * sv, float(sv.square().sum()), sizes), rel=1e-9)


def test_the_unit_metric_sees_the_error_that_a_massive_activation_hides_from_the_gram():
    """One input 1000x the norm of the others: in X^T X it holds ~97% of the energy, so a rank-1 truncation
    that keeps its direction looks nearly free; counted once per token, what it drops is most of W's
    action on the other 300."""
    x = _tokens(massive=True)
    w = torch.randn(8, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    factor = cholesky_factor(x.T @ x).factor
    u, sv, vh = torch.linalg.svd(w @ factor, full_matrices=False)
    spectrum = sv.square()
    weights = pricing_weights(factor, _unit_gram(x), vh)
    gram_share = float(spectrum[1:].sum() / spectrum.sum())
    unit_share = float((spectrum * weights)[1:].sum() / (spectrum * weights).sum())
    assert gram_share < 0.05 < 0.5 < unit_share
    # exact for the truncated SVD: the unit-metric error of what rank 1 drops, measured directly
    rank1 = (u[:, :1] * sv[:1]) @ vh[:1] @ torch.linalg.inv(factor)
    unit_x = x / x.norm(dim=1, keepdim=True)
    direct = float(((w - rank1) @ unit_x.T).square().sum() / (w @ unit_x.T).square().sum())
    assert unit_share == pytest.approx(direct, rel=1e-8)


def test_lowrank_only_auto_predicts_no_more_loss_than_uniform_ranks(data):
    """On the same menu, the uniform SVD-LLM ranks are one feasible pick; the knapsack's is at least as good."""
    from factorkit.methods.auto import profile_menus

    model = tiny_llama(seed=3, hidden=64)
    config = fk.AutoConfig(ratio=0.3, types=("lowrank",), rank_options=1000)
    menus = profile_menus(model, config, data, config.types, progress=False)
    uniform_loss, uniform_bytes = 0.0, 0
    for name, menu in menus.items():
        m, n = linear_weight(model.get_submodule(name)).shape
        rank = fk.solvers.rank_for_ratio(m, n, 0.3)
        option = next(o for o in menu if o.size == (rank,))
        uniform_loss += option.loss
        uniform_bytes += option.bytes
    fit = fk.compress(model, config, data, progress=False).fit
    assert fit["bytes"] <= fit["budget_bytes"] and uniform_bytes <= fit["budget_bytes"]
    assert fit["predicted_loss"] <= uniform_loss + 1e-12
    assert set(fit["types"]) <= {"lowrank", "dense"}


def test_cospadi_global_spends_one_budget_on_dictionaries_only(data):
    model = tiny_llama(seed=4, hidden=64)
    names = list(model_targets(model, None))
    dense = stored_bytes(model, names)
    fit = fk.compress(model, fk.CoSpaDiConfig(ratio=0.3, allocation="global", iterations=2),
                      data, progress=False).fit
    assert set(fit["types"]) <= {"dictionary", "dense"} and "dictionary" in fit["types"]
    assert stored_bytes(model, names) <= 0.7 * dense
    sizes = {tuple(c["size"]) for c in fit["choice"].values() if c["type"] == "dictionary"}
    assert len(sizes) >= 2  # not one ratio for every matrix


def test_dsformer_global_starts_each_matrix_at_its_chosen_size_within_one_budget(data, tmp_path):
    from factorkit.methods.auto import allocate
    from factorkit.training import TrainConfig

    model = tiny_llama(seed=5, hidden=64)
    names = list(model_targets(model, None))
    dense = stored_bytes(model, names)
    config = fk.DSFormerConfig(ratio=0.3, allocation="global", train=TrainConfig(steps=2, lr=1e-3, batch_size=4))
    chosen, _ = allocate(tiny_llama(seed=5, hidden=64), config, data, ("dictionary",), progress=False)
    fit = fk.compress(model, config, data, progress=False).fit
    assert stored_bytes(model, names) == fit["bytes"] <= fit["budget_bytes"] <= 0.7 * dense
    for name, option_ in chosen.items():  # the same pick as allocating alone, and each module built to it
        assert fit["choice"][name]["size"] == list(option_.size)
        module = model.get_submodule(name)
        if option_.kind == "dense":
            assert type(module) is torch.nn.Linear
        else:
            assert isinstance(module, DictionaryLinear) and (module.atoms.shape[0], module.sparsity) == option_.size
    assert len({tuple(c["size"]) for c in fit["choice"].values()}) >= 2 and len(fit["losses"]) == 2
    fk.save(model, tmp_path / "ds")
    with torch.no_grad():
        assert torch.equal(model(data[:2]).logits, fk.load(tmp_path / "ds")(data[:2]).logits)


@pytest.mark.parametrize("argv, expected", [
    (["--method", "auto", "--types", "lowrank,tucker"], "--types must be one or more of lowrank, dictionary"),
    (["--method", "cospadi", "--allocation", "global", "--group", "2"], "global does not combine with --group"),
    (["--method", "cospadi", "--estimate", "probe"], "--estimate applies only with --allocation global"),
    (["--method", "auto", "--probe-iterations", "3"], "--probe-iterations applies only with --estimate probe"),
    (["--method", "auto", "--types", "dictionary", "--ratio", "0.8"], "no dictionary on the menu small enough"),
    (["--method", "auto", "--ratio", "0.8"], "more than any option on the menu removes from a matrix; lower the "
                                             "ratio or raise --max-removal"),
    (["--method", "auto", "--max-removal", "0"], "--max-removal must lie in (0, 1]"),
    (["--method", "auto", "--allocation", "global"], "--allocation applies to --method"),
    (["--method", "dsformer", "--allocation", "global", "--pattern", "2:4"], "does not combine with --pattern 2:4"),
    (["--method", "dsformer", "--allocation", "global", "--init", "random"], "does not combine with --init random"),
    (["--method", "dsformer", "--fisher-samples", "2"], "--fisher-samples applies only with --allocation global"),
])
def test_bad_allocation_settings_are_one_sentence(argv, expected, capsys, tmp_path):
    code = main(["-q", "compress", *argv, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_the_eigenbasis_estimate_is_the_error_of_the_best_sparse_code_in_the_singular_basis():
    from factorkit.methods.auto import eigenbasis_errors

    gen = torch.Generator().manual_seed(0)
    Y = torch.randn(40, 24, generator=gen, dtype=torch.float64) @ torch.diag(torch.linspace(3, 0.1, 24, dtype=torch.float64))
    u, sv, vh = torch.linalg.svd(Y, full_matrices=False)
    energy = float(Y.square().sum())
    sizes = [(24, 24), (24, 6), (12, 6), (8, 1), (30, 4)]
    got = eigenbasis_errors(u * sv, energy, sizes)
    for (k, s), err in zip(sizes, got):
        D = vh[: min(k, 24)]  # orthonormal atoms
        codes = Y @ D.T
        keep = torch.zeros_like(codes).scatter_(1, codes.abs().topk(min(s, k), dim=1).indices, 1.0)
        explicit = float((Y - (codes * keep) @ D).norm() / Y.norm())
        assert err == pytest.approx(explicit, abs=1e-10)
    assert got[0] == pytest.approx(0.0, abs=1e-7)
    assert got[2] >= got[1]  # fewer atoms at the same sparsity: never better


def _sparse_coded(m=96, n=48, atoms=40, nonzeros=6, seed=0):
    """Rows that are sparse combinations of a few non-orthogonal atoms, plus a little noise: a dictionary of
    that size fits them well, the singular basis with few nonzeros does not."""
    gen = torch.Generator().manual_seed(seed)
    D = torch.randn(atoms, n, generator=gen, dtype=torch.float64)
    C = torch.zeros(m, atoms, dtype=torch.float64)
    C.scatter_(1, torch.rand(m, atoms, generator=gen).argsort(1)[:, :nonzeros],
               torch.randn(m, nonzeros, generator=gen, dtype=torch.float64))
    return C @ D + 0.01 * torch.randn(m, n, generator=gen, dtype=torch.float64)


def test_the_refined_estimate_lies_between_the_rank_bound_and_the_eigenbasis_estimate_and_nears_the_solve():
    from factorkit.methods.auto import eigenbasis_errors, refined_errors
    from factorkit.solvers.dictionary import sparse_dictionary

    Y = _sparse_coded()
    u, sv, vh = torch.linalg.svd(Y, full_matrices=False)
    energy = float(Y.square().sum())
    sizes = [(40, 6), (30, 8), (20, 4), (48, 48), (60, 10)]
    eigen = eigenbasis_errors(u * sv, energy, sizes)
    refined = refined_errors(Y, u, sv, vh, sizes)
    for (k, s), e, r in zip(sizes, eigen, refined):
        # no k atoms do better than the best rank-k approximation; the refinement starts from the eigenbasis code
        rank_bound = (float(sv[min(k, 48):].square().sum()) / energy) ** 0.5
        assert rank_bound - 1e-9 <= r <= e + 1e-12
    # s = k = n: every row exactly (the Gram form of the residual is exact only to about eps x energy)
    assert refined[3] == pytest.approx(0.0, abs=1e-6)
    # where the eigenbasis estimate is far above what a fit reaches, the refined one is closer
    fit = sparse_dictionary([Y], 40, 6, iterations=8, start="svd")[0].errors[-1]
    assert refined[0] < eigen[0] and abs(refined[0] - fit) < 0.75 * abs(eigen[0] - fit)


def test_refined_menus_scale_the_eigenbasis_prices_by_the_correction_found_at_the_probe_ratios():
    from factorkit.methods.auto import PROBE_RATIOS, DICTIONARY_RATIOS, dictionary_options, refined_errors
    from factorkit.solvers.dictionary import dictionary_budget
    from factorkit.solvers.whitening import cholesky_factor

    gen = torch.Generator().manual_seed(1)
    weight = _sparse_coded(m=96, n=48, seed=1).float()
    X = torch.randn(400, 48, generator=gen, dtype=torch.float64)
    gram = X.T @ X
    whitened = weight.double() @ cholesky_factor(gram).factor
    u, sv, vh = torch.linalg.svd(whitened, full_matrices=False)
    energy = float(sv.square().sum())
    args = (weight, gram, 2.0, energy)
    eigen = dictionary_options(*args, fk.AutoConfig(estimate="eigenbasis"), u * sv)
    refined = dictionary_options(*args, fk.AutoConfig(estimate="refined"), u * sv, (whitened, u, sv, vh))
    assert [o.size for o in eigen] == [o.size for o in refined] and [o.bytes for o in eigen] == [o.bytes for o in refined]
    assert all(r.loss <= e.loss * (1 + 1e-12) for e, r in zip(eigen, refined))
    assert sum(r.loss for r in refined) < 0.9 * sum(e.loss for e in eigen)
    # at the probe ratios the price is the refined error itself (loss = sensitivity x error^2 x energy)
    ratios = [q for q in DICTIONARY_RATIOS if min(dictionary_budget(48, 96, q, 2.0, count="storage", value_bits=32)) >= 1]
    for q in PROBE_RATIOS:
        option_ = refined[ratios.index(q)]
        err = refined_errors(whitened, u, sv, vh, [option_.size])[0]
        assert option_.loss == pytest.approx(2.0 * err * err * energy, rel=1e-9)
    # DSFormer's global allocation has no estimate option: it is priced by what its SVD start does, the
    # eigenbasis code, even when handed the whitened SVD that the refinement would use
    dsformer = dictionary_options(*args, fk.DSFormerConfig(ratio=0.2, allocation="global"), u * sv,
                                  (whitened, u, sv, vh))
    assert [o.loss for o in dsformer] == [o.loss for o in eigen]


def test_improve_code_returns_the_residual_of_what_it_returns_and_never_raises_it():
    """The residuals come from the Gram of the atoms, never from the product: they must equal
    ||Y - C A||^2 of the returned codes and atoms, from a start with non-orthonormal atoms."""
    from factorkit.solvers.dictionary import improve_code

    gen = torch.Generator().manual_seed(4)
    Y = _sparse_coded(m=120, n=48, seed=4)
    atoms = torch.randn(32, 48, generator=gen, dtype=torch.float64)  # not orthonormal, not the fit's atoms
    least = torch.linalg.lstsq(atoms.T, Y.T).solution.T
    keep = least.abs().topk(5, dim=1).indices
    codes = torch.zeros_like(least).scatter_(1, keep, least.gather(1, keep))
    start = float((Y - codes @ atoms).square().sum())
    residual, c, a = improve_code(Y, codes, atoms, 5)
    assert residual == pytest.approx(float((Y - c @ a).square().sum()), rel=1e-9)
    assert residual <= start and residual < 0.9 * start
    assert int((c != 0).sum(1).max()) <= 5


def test_the_compress_table_lists_each_factor_type_and_its_bytes(capsys, model_dir, text_file, tmp_path,
                                                                monkeypatch):
    """A user of --method auto sees, without reading the JSON, how many matrices took each type, the bytes
    each holds, the bytes against the budget and where the time went."""
    import json

    from factorkit.api import STORED_AS

    monkeypatch.setenv("COLUMNS", "200")  # one table row per line
    report = tmp_path / "report.json"
    code = main(["-q", "--json", str(report), "compress", "--model", str(model_dir), "--method", "auto", "--ratio",
                 "0.4", "--iterations", "1", "--calib", str(text_file), "--calib-samples", "4", "--calib-seq-len",
                 "32", "--out", str(tmp_path / "auto")])
    out, err = capsys.readouterr()
    assert code == 0, err
    fit = json.loads(report.read_text())["compression"]["fit"]
    lines = out.splitlines()
    for kind, entry in fit["types"].items():
        row = next(line for line in lines if f"matrices {STORED_AS[kind]}" in line)
        assert f"{entry['matrices']}, " in row
    assert sum(e["matrices"] for e in fit["types"].values()) == len(fit["choice"])
    assert f"of the {len(fit['choice'])} targeted matrices" in " ".join(lines)
    assert any("budget" in line for line in lines)
    assert any("Fisher / profile / knapsack / solve time" in line for line in lines)


@pytest.mark.parametrize("make", [lambda **kw: fk.AutoConfig(ratio=0.4, iterations=2, **kw),
                                  lambda **kw: fk.CoSpaDiConfig(ratio=0.3, iterations=2, allocation="global", **kw)],
                         ids=["auto", "cospadi-global"])
def test_an_interrupted_allocation_resumes_to_the_same_model(make, data, tmp_path, monkeypatch):
    import factorkit.methods.auto as auto_method

    reference = tiny_llama(seed=6, layers=3, hidden=64)
    choice = fk.compress(reference, make(), data, progress=False).fit["choice"]
    per_block = [sum(c["type"] == "dictionary" for n, c in choice.items() if f"layers.{i}." in n) for i in range(3)]
    assert per_block[0] and per_block[1]  # the run stops in block 1, after block 0 is finished
    solve, allocate, solved = auto_method.sparse_dictionary, auto_method.allocate, []
    folder = tmp_path / "ck"
    monkeypatch.setattr(auto_method, "sparse_dictionary", interrupting(solve, solved, stop_at=per_block[0]))
    with pytest.raises(KeyboardInterrupt):
        fk.compress(tiny_llama(seed=6, layers=3, hidden=64), make(checkpoint_dir=str(folder)), data, progress=False)
    assert (folder / "allocation.info.json").exists()

    def no_allocation(*args, **kwargs):
        raise AssertionError("the allocation was kept: no second profile")

    solved.clear()
    monkeypatch.setattr(auto_method, "sparse_dictionary", interrupting(solve, solved, stop_at=None))
    monkeypatch.setattr(auto_method, "allocate", no_allocation)
    model = tiny_llama(seed=6, layers=3, hidden=64)
    fit = fk.compress(model, make(checkpoint_dir=str(folder)), data, progress=False).fit
    assert fit["allocation_restored"] and fit["restored_blocks"] == 1
    assert len(solved) == per_block[1] + per_block[2]  # block 0 restored, not solved again
    ids = data[:2]
    assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    monkeypatch.setattr(auto_method, "allocate", allocate)
    with pytest.raises(fk.FactorkitError, match="another run"):
        fk.compress(tiny_llama(seed=6, layers=3, hidden=64), make(checkpoint_dir=str(folder), seed=1), data,
                    progress=False)
