"""The compiled DictionaryLinear kernels (factorkit.kernels) against the dense product, and the fallback."""

import logging

import pytest
import torch

from factorkit import kernels
from factorkit.factors import DictionaryLinear
from factorkit.factors.dictionary import COMPILED

needs_ext = pytest.mark.skipif(kernels.dictionary() is None, reason="the compiled kernels could not be built here")


def random_dictionary(out: int, n: int, k: int, s: int, blocks: int, seed: int) -> DictionaryLinear:
    gen = torch.Generator().manual_seed(seed)
    rows = out // blocks
    idx = torch.stack([torch.randperm(k, generator=gen)[:s] + o // rows * k for o in range(out)])
    return DictionaryLinear.from_codes(torch.randn(blocks * k, n, generator=gen), idx,
                                       torch.randn(out, s, generator=gen), torch.randn(out, generator=gen),
                                       blocks=blocks)


@needs_ext
@pytest.mark.parametrize("out,n,k,s,blocks", [(37, 29, 21, 7, 1), (64, 50, 70, 35, 2), (12, 10, 3, 1, 3),
                                              (40, 17, 16, 16, 1), (33, 9, 131, 60, 1)])
def test_compiled_kernels_match_the_dense_product(out, n, k, s, blocks):
    """Odd sizes, mask tails (k not a multiple of 8 or 16), full rows (s = k), row blocks, 1-70 tokens."""
    module = random_dictionary(out, n, k, s, blocks, seed=out)
    W = module.dense_weight()
    torch_codes = module.code_matrix()  # the values need a gradient: torch's masked scatter
    with torch.no_grad():  # no gradient: the compiled kernel writes C from the mask
        assert torch.equal(module.code_matrix(), torch_codes.detach())
    gen = torch.Generator().manual_seed(1)
    kinds = kernels.usable(kernels.dictionary())
    assert kinds == COMPILED  # both on every vector build (AVX-512, AVX2); the test skips where none is built
    for tokens in (1, 2, 7, 9, 16, 17, 70, 130):  # 130: past one pass of 64 tokens in the lanes, and a tail
        x = torch.randn(tokens, n, generator=gen)
        want = torch.addmm(module.bias.double(), x.double(), W.double().T)
        for kernel in kinds:
            module.kernel = kernel
            with torch.no_grad():
                got = module(x)
            # float32 sums of at most s terms of size ~|x||a||v|: 1e-4 relative to the largest output
            assert (got.double() - want).abs().max() <= 1e-4 * want.abs().max(), (kernel, tokens)
    half = module.to(torch.bfloat16)  # bfloat16 values and inputs, float32 accumulation
    x = torch.randn(5, n, generator=gen).bfloat16()
    want = torch.addmm(half.bias.double(), x.double(), half.dense_weight().double().T)
    for kernel in kinds:
        half.kernel = kernel
        with torch.no_grad():
            got = half(x).double()
        # h and y are rounded to bfloat16 (8 bits of mantissa) once each
        assert (got - want).abs().max() <= 2 ** -6 * want.abs().max() * 2, kernel


@needs_ext
def test_the_avx2_and_scalar_builds_match_the_dense_product_too():
    """The paths other machines take, compiled here with the wider instruction sets switched off."""
    module = random_dictionary(45, 19, 37, 17, 1, seed=8)  # 37 atoms: a partial last mask byte
    C = module.code_matrix().detach()
    gen = torch.Generator().manual_seed(2)
    variants = {"scalar": ("-mno-avx2", "-mno-avx512f")}
    if kernels.dictionary().isa() in ("avx2", "avx512"):
        variants["avx2"] = ("-mno-avx512f",)
    for isa, flags in variants.items():
        ext = kernels.build((*flags, "-O1"), suffix=f"_{isa}_o1")  # -O1: what is checked is the code path, built fast
        assert ext.isa() == isa
        for tokens in (1, 3, 6):
            h = torch.randn(tokens, 37, generator=gen)
            for values in (module.values.detach(), module.values.detach().bfloat16()):
                got = ext.mask_codes(h, module.support, values.contiguous(), 37, 1)
                want = h.double() @ C.to(values.dtype).double().T
                assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max(), (isa, tokens, values.dtype)
            assert torch.equal(ext.codes_dense(module.support, module.values.detach().contiguous(), 37, 1), C)
            check_lanes(ext, module, h)
            check_int8_mask_codes(ext, module, h, (isa, tokens))
        for tokens, (out, n, group) in zip((1, 3, 6), ((21, 37, 37), (40, 96, 32), (9, 100, 50))):
            q, scale, x = random_int8(out, n, group, tokens, seed=tokens)
            want = x.double() @ dequantized(q, scale, group).T
            got = ext.int8_rows(x, q, scale, group)
            assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max(), (isa, tokens)


def check_lanes(ext, module: DictionaryLinear, h: torch.Tensor) -> None:
    """ext.mask_codes_lanes (h transposed, padded to the build's lane width) against h C^T, or its refusal on
    the scalar build, which has no lanes kernel."""
    width = ext.lane_width()
    if not width:
        with pytest.raises(RuntimeError, match="AVX-512 or AVX2 build"):
            ext.mask_codes_lanes(h.T.contiguous(), module.support, module.values.detach(), module.num_atoms, 1)
        return
    C = module.code_matrix().detach().double()
    for tokens in (h.shape[0], 3 * width + 1, 9 * width):  # past one pass of 64 tokens: 9 vectors
        x = torch.cat([h] * (tokens // h.shape[0] + 1))[:tokens]
        hT = torch.nn.functional.pad(x, (0, 0, 0, -tokens % width)).T.contiguous()
        got = ext.mask_codes_lanes(hT, module.support, module.values.detach(), module.num_atoms, 1)[:, :tokens].T
        want = x.double() @ C.T
        assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max(), (ext.isa(), tokens)
    with pytest.raises(RuntimeError, match="multiple of lane_width"):
        ext.mask_codes_lanes(torch.zeros(module.num_atoms, width + 1), module.support, module.values.detach(),
                             module.num_atoms, 1)


def check_int8_mask_codes(ext, module: DictionaryLinear, h: torch.Tensor, what) -> None:
    """ext.mask_codes_int8 with integer values in place of the module's, scaled per row, per group of a row
    and per group of rows, against h times the dequantized code matrix."""
    out, s = module.values.shape
    gen = torch.Generator().manual_seed(out * s)
    q = torch.randint(-128, 128, (out, s), generator=gen, dtype=torch.int8)
    groupings = [(s, False)] + [(g, False) for g in (2, 4) if s % g == 0] + [(g, True) for g in (3, 5) if out % g == 0]
    for group, by_columns in groupings:
        scale = torch.rand(*((out // group, s) if by_columns else (out, s // group)), generator=gen) + 0.01
        values = q.double() * scale.double().repeat_interleave(group, dim=0 if by_columns else 1)
        C = torch.zeros(out, h.shape[1], dtype=torch.float64).masked_scatter(module.code_matrix() != 0, values)
        got = ext.mask_codes_int8(h, module.support, q, scale, group, by_columns, module.num_atoms, module.blocks)
        want = h.double() @ C.T
        assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max(), (what, group, by_columns)


@needs_ext
@pytest.mark.parametrize("out,n,k,s,blocks", [(37, 29, 21, 7, 1), (60, 50, 70, 36, 2), (15, 10, 3, 1, 3),
                                              (45, 17, 16, 16, 1), (33, 9, 131, 60, 1)])
def test_the_mask_kernel_reads_int8_values_and_their_scales(out, n, k, s, blocks):
    """Odd sizes, mask tails, full rows, row blocks; one scale per row, per group of a row, per group of rows."""
    module = random_dictionary(out, n, k, s, blocks, seed=out + 1)
    gen = torch.Generator().manual_seed(3)
    for tokens in (1, 2, 5, 9, 17):
        check_int8_mask_codes(kernels.dictionary(), module, torch.randn(tokens, blocks * k, generator=gen), tokens)
    q = torch.zeros(out, s, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="one scale per group"):
        kernels.dictionary().mask_codes_int8(torch.zeros(1, blocks * k), module.support, q, torch.ones(out, s + 1),
                                             1, False, k, blocks)


def random_int8(out: int, n: int, group: int, tokens: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(-128, 128, (out, n), generator=gen, dtype=torch.int8)
    scale = torch.rand(out, n // group, generator=gen) + 0.01
    return q, scale, torch.randn(tokens, n, generator=gen)


def dequantized(q: torch.Tensor, scale: torch.Tensor, group: int) -> torch.Tensor:
    return q.double() * scale.double().repeat_interleave(group, dim=1)


@needs_ext
@pytest.mark.parametrize("out,n,group", [(37, 29, 29), (64, 96, 32), (5, 200, 40), (130, 17, 17), (16, 64, 64)])
def test_the_int8_kernel_matches_the_product_with_the_dequantized_weight(out, n, group):
    """Rows of 17-200 integers (tails shorter than a vector), one scale per row or per group, 1-9 tokens."""
    for tokens in (1, 2, 3, 4, 5, 8, 9):
        q, scale, x = random_int8(out, n, group, tokens, seed=tokens)
        want = x.double() @ dequantized(q, scale, group).T
        got = kernels.dictionary().int8_rows(x, q, scale, group)
        # float32 sums of n products: 1e-5 of the largest output
        assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max(), tokens
    with pytest.raises(RuntimeError, match="group must divide"):
        kernels.dictionary().int8_rows(x, q, scale, n + 1)


@needs_ext
@pytest.mark.parametrize("out,n,group", [(64, 7, 32), (96, 33, 32), (17, 40, 17)])
def test_the_int8_kernel_with_scales_down_the_columns_matches_too(out, n, group):
    """torchao block (group, 1): each group of rows has one scale per column (int4 factors of odd rank)."""
    gen = torch.Generator().manual_seed(out)
    q = torch.randint(-8, 8, (out, n), generator=gen, dtype=torch.int8)
    scale = torch.rand(out // group, n, generator=gen) + 0.01
    for tokens in (1, 2, 5, 8):
        x = torch.randn(tokens, n, generator=gen)
        want = x.double() @ (q.double() * scale.double().repeat_interleave(group, dim=0)).T
        got = kernels.dictionary().int8_colgroups(x, q, scale, group)
        assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max(), tokens


@needs_ext
def test_the_compiled_kernels_keep_no_index_and_leave_training_to_torch():
    module = random_dictionary(48, 20, 24, 12, 1, seed=3)
    module.kernel = "auto"
    module.__dict__.pop("_indices_cache", None)
    assert "indices" not in dict(module.named_buffers())
    with torch.no_grad():
        module(torch.randn(1, 20))
        module(torch.randn(300, 20))  # the code GEMM builds C from the mask, too
    assert "_indices_cache" not in module.__dict__  # no int32 copy of the support held in memory
    x = torch.randn(4, 20, requires_grad=True)
    module(x).sum().backward()  # with a gradient auto takes torch's kernels
    assert x.grad is not None and module.values.grad is not None
    module.kernel = "mask"
    with pytest.raises(ValueError, match="a gradient is needed"):
        module(torch.randn(4, 20, requires_grad=True))


def test_without_the_compiled_kernels_the_torch_kernels_give_the_same_result(monkeypatch, caplog):
    module = random_dictionary(30, 16, 20, 6, 1, seed=4)
    x = torch.randn(3, 16)
    with torch.no_grad():
        want = module(x)
    monkeypatch.setenv(kernels.DISABLE_ENV, "0")
    try:
        assert kernels.dictionary() is None
        assert module.pick_kernel(3) == "sparse"
        with torch.no_grad():
            assert torch.allclose(module(x), want, atol=1e-5)
        module.kernel = "mask"
        with pytest.raises(ValueError, match="not built on this machine"), torch.no_grad():
            module(x)
        # a failed build says so in one logged sentence and falls back
        monkeypatch.setenv(kernels.DISABLE_ENV, "1")
        kernels._build.cache_clear()

        def broken(**_):
            raise RuntimeError("error: command 'c++' failed")

        monkeypatch.setattr("torch.utils.cpp_extension.load", broken)
        with caplog.at_level(logging.WARNING, logger="factorkit"):
            assert kernels.dictionary() is None
        assert len(caplog.records) == 1 and "falling back" in caplog.records[0].getMessage()
        assert "c++' failed" in caplog.records[0].getMessage()
    finally:
        kernels._build.cache_clear()


def test_a_compiler_without_openmp_still_gets_the_compiled_kernels(monkeypatch, caplog):
    """Where the OpenMP build fails (Linux with a compiler lacking it), the kernels are built without it under
    another name, with one logged sentence; elsewhere nothing is retried."""
    calls, built = [], object()

    def load(name, extra_cflags, extra_ldflags, **_):
        calls.append((name, tuple(extra_cflags), tuple(extra_ldflags)))
        if "-fopenmp" in extra_cflags:
            raise RuntimeError("fatal error: omp.h: No such file or directory")
        return built

    monkeypatch.setattr("torch.utils.cpp_extension.load", load)
    monkeypatch.setattr("torch.utils.cpp_extension.is_ninja_available", lambda: True)
    monkeypatch.setattr(kernels, "OPENMP", ("-fopenmp",))
    with caplog.at_level(logging.WARNING, logger="factorkit"):
        assert kernels.build() is built
    assert [c[0].endswith("_serial") for c in calls] == [False, True]
    assert "-fopenmp" not in calls[1][1] + calls[1][2]
    assert len(caplog.records) == 1 and "omp.h" in caplog.records[0].getMessage()
    assert "one thread" in caplog.records[0].getMessage()
    calls.clear()
    monkeypatch.setattr(kernels, "OPENMP", ())  # macOS, Windows: built once, without OpenMP
    assert kernels.build() is built and len(calls) == 1 and not calls[0][0].endswith("_serial")


@needs_ext
def test_the_compiled_kernels_give_the_same_bits_on_any_number_of_threads():
    module = random_dictionary(300, 64, 90, 40, 3, seed=1)  # rows are spread over the threads
    x = torch.randn(20, 64)
    threads = torch.get_num_threads()
    results = {}
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            for kernel in kernels.usable(kernels.dictionary()) + ("codes",):
                module.kernel = kernel
                with torch.no_grad():
                    results[kernel, n] = module(x)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(results[k, 1], results[k, 2]) for k, _ in results)


@needs_ext
def test_the_compiled_kernels_run_on_torch_s_threads():
    # built without OpenMP, at::parallel_for ignores its pragma and every kernel runs on one thread
    ext = kernels.dictionary()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert ext.parallel_threads(64) == 2
        torch.set_num_threads(1)
        assert ext.parallel_threads(64) == 1
    finally:
        torch.set_num_threads(threads)
