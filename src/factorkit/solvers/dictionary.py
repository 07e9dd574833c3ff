"""Sparse dictionary learning for CoSpaDi: Batch-OMP sparse coding and K-SVD atom updates.

Problem. Signals are the columns of Y (n x B). Find a dictionary D (n x k) with
unit-norm atoms and codes C (k x B) with exactly s nonzeros per column that
minimise ||Y - D C||_F. CoSpaDi takes Y = L.T @ W.T with L L.T = X.T X, so that
||Y - D C||_F is the calibration output error ||X W.T - X W'.T||_F.

Batch-OMP (Rubinstein, Zibulevsky & Elad, 2008) codes many signals against one
dictionary using only its Gram matrix G = D.T D and the correlations D.T Y:
the cost per signal is independent of n. This implementation keeps, per
signal, the correlations of every atom with the orthonormalised selected atoms
(P = G[:, I] L^-T, where L L.T = G[I, I]). Row j of P is then the new row of
the Cholesky factor when atom j joins, and its new column costs one k x t
product, so the whole support of s atoms costs k s^2 / 2 multiply-adds per
signal, done for a chunk of signals at once with batched products.

K-SVD (Aharon, Elad & Bruckstein, 2006) then updates the atoms one at a time:
atom j and its coefficients on the signals that use it get the best rank-1
fit to the residual those signals would have without atom j, by power
iterations started from the current pair, which never increases the error.

OMP from scratch at every alternation is the expensive part (k s^2 / 2 per
signal with s = k / 2 at CoSpaDi's budgets), so ``learn_dictionary`` can
refresh the supports on a schedule and run K-SVD sweeps (atoms and
coefficients on the current supports) in between; a refresh keeps a signal's
new code only where it lowers that signal's error, so the objective never
increases from one alternation to the next.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from .. import kernels
from .whitening import cholesky_factor


def batch_omp(gram: torch.Tensor, correlations: torch.Tensor, sparsity: int,
              chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthogonal matching pursuit with exactly ``sparsity`` atoms per signal.

    gram: D.T @ D (k x k) of a dictionary with unit-norm atoms.
    correlations: Y.T @ D (B x k), one row per signal.
    Returns (indices, values), both (B x s): the atoms in the order OMP chose
    them and the least-squares coefficients on that support. Atoms are taken
    by the largest |correlation with the residual|, as in scikit-learn's
    ``orthogonal_mp_gram``. An atom that is (numerically) a combination of
    atoms already chosen is kept in the support with coefficient 0.
    chunk: signals coded at once by the torch version (default: on the CPU as
    many as keep their state within about 8 MiB, 8 to 64; on a GPU as many as
    fit in about 1 GiB). The result does not depend on it: every signal is
    coded on its own. On the CPU the compiled kernel (``kernels/solver.cpp``: the
    same steps per signal, without a dozen dispatched tensor operations per
    step) codes the signals when it is built, ignoring ``chunk``; its sums
    round differently from the batched products, so values agree with the
    torch version to rounding and supports wherever no two atoms tie to it.
    """
    k = gram.shape[0]
    if gram.shape != (k, k) or correlations.ndim != 2 or correlations.shape[1] != k:
        raise ValueError(f"gram must be (k, k) and correlations (B, k); got {tuple(gram.shape)} "
                         f"and {tuple(correlations.shape)}")
    if not 1 <= sparsity <= k:
        raise ValueError(f"sparsity must lie in [1, {k}], got {sparsity}")
    s, B = sparsity, correlations.shape[0]
    dtype, device = correlations.dtype, correlations.device
    gram = gram.to(dtype)
    tiny = float(gram.diagonal().max()) * (1e-6 if dtype == torch.float32 else 1e-12)
    ext = kernels.dictionary() if device.type == "cpu" and dtype in (torch.float32, torch.float64) else None
    if ext is not None:
        return tuple(ext.batch_omp(gram, correlations, s, tiny))
    if chunk is None:
        # the per-signal state P (s x k) is re-read at every step: on a CPU a chunk's worth should stay in cache
        # (about 8 MiB; at k 444, s 222 a chunk of 16 ran faster than one of 64), with at least 8 signals to a
        # step so that Python's per-step cost stays small; on a GPU about 1 GiB
        per_signal = s * k * correlations.element_size()
        chunk = (max(8, min(64, (8 << 20) // per_signal)) if device.type == "cpu"
                 else max(1, (1 << 30) // per_signal))
    indices = torch.empty(B, s, dtype=torch.long, device=device)
    values = torch.empty(B, s, dtype=dtype, device=device)
    for start in range(0, B, chunk):
        alpha = correlations[start : start + chunk].clone()  # D.T r, r the residual
        n = b = alpha.shape[0]
        if b == 1:  # baddbmm runs a batch of one as a matrix-vector product, whose sums round differently on
            alpha, b = alpha.repeat(2, 1), 2  # some CPUs (Intel Xeon): coded beside a copy, as in any chunk
        P = torch.zeros(b, s, k, dtype=dtype, device=device)  # P[:, t] = D.T q_t, q_t orthonormalised atom t
        used = torch.zeros(b, k, dtype=torch.bool, device=device)
        score = torch.empty(b, k, dtype=dtype, device=device)
        chosen, proj, norms = [], [], []  # per step: atom j, q_t . y, ||d_j - projection||
        for t in range(s):
            j = torch.abs(alpha, out=score).masked_fill_(used, -1.0).argmax(1, keepdim=True)  # (b, 1)
            if t:
                w = torch.gather(P[:, :t], 2, j.unsqueeze(1).expand(b, t, 1)).transpose(1, 2)  # row t of L
                v = torch.baddbmm(gram[j], w, P[:, :t], alpha=-1.0).squeeze(1)
            else:
                v = gram[j.squeeze(1)]
            norm2 = v.gather(1, j).squeeze(1)  # ||d_j||^2 - ||w||^2
            norm = norm2.clamp_min(tiny).sqrt_()
            # a dependent atom gets q = 0: no column in P, coefficient 0
            scale = (norm2 > tiny) / norm
            p = torch.mul(v, scale[:, None], out=P[:, t])
            c = alpha.gather(1, j).squeeze(1).mul_(scale)
            alpha.addcmul_(p, c[:, None], value=-1.0)
            used.scatter_(1, j, True)
            chosen.append(j)
            proj.append(c)
            norms.append(norm)
        support = torch.cat(chosen, 1)
        # y ~ Q proj with Q = D_I L^-T, L L.T = G[I, I]; L.T[i, t] = q_i . d_(j_t) = P[:, i, j_t], upper triangular
        Lt = torch.gather(P, 2, support.unsqueeze(1).expand(b, s, s)).triu_(1)
        Lt.diagonal(dim1=1, dim2=2).copy_(torch.stack(norms, 1))
        indices[start : start + n] = support[:n]
        values[start : start + n] = torch.linalg.solve_triangular(
            Lt, torch.stack(proj, 1).unsqueeze(2), upper=True).squeeze(2)[:n]
    return indices, values


def codes_to_dense(indices: torch.Tensor, values: torch.Tensor, atoms: int) -> torch.Tensor:
    """The (k x B) coefficient matrix of codes given as (B x s) indices and values."""
    dense = torch.zeros(atoms, indices.shape[0], dtype=values.dtype, device=values.device)
    return dense.scatter_(0, indices.T, values.T)


def _atom_users(indices: torch.Tensor, atoms: int) -> list[torch.Tensor]:
    """For every atom, the flat positions (into indices.flatten()) of the codes that use it."""
    flat = indices.flatten()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=atoms)
    return list(torch.split(order, counts.tolist()))


def ksvd_sweep(residual: torch.Tensor, atoms: torch.Tensor, indices: torch.Tensor, values: torch.Tensor,
               power_iterations: int = 2) -> None:
    """One K-SVD pass over all atoms, in place.

    Row layout (rows are contiguous, so gathering the signals of one atom is
    cheap): residual = Y.T - C.T D.T (B x n, one row per signal), atoms = D.T
    (k x n, unit-norm rows), codes (B x s). For each atom j with users w:
    E = residual[w] + c_j[w] d_j.T is the error without atom j; (d_j, c_j[w])
    becomes the rank-1 fit of E from ``power_iterations`` power iterations
    started at the current pair, which never increases ||E - c d.T||. The
    residual is kept up to date. Atoms no signal uses are left for
    ``reinit_unused``. On the CPU the compiled kernel (``kernels/solver.cpp``)
    runs the same updates when it is built; its sums round differently.
    """
    ext = kernels.dictionary() if residual.device.type == "cpu" and residual.dtype in (torch.float32,
                                                                                       torch.float64) else None
    if ext is not None and residual.is_contiguous() and atoms.is_contiguous() and values.is_contiguous():
        ext.ksvd_sweep(residual, atoms, indices, values, power_iterations)
        return
    s = indices.shape[1]
    flat_values = values.view(-1)
    for j, users in enumerate(_atom_users(indices, atoms.shape[0])):
        if users.numel() == 0:
            continue
        rows = users // s
        g = flat_values[users]
        d = atoms[j]
        E = residual.index_select(0, rows).addr_(g, d)
        for _ in range(power_iterations):
            d_new = g @ E
            norm = torch.linalg.vector_norm(d_new)
            # all-zero coefficients: keep the atom, refit them (no host sync, so a GPU never waits)
            d = torch.where(norm > 0, d_new / norm, d)
            g = E @ d
        residual.index_copy_(0, rows, E.addr_(g, d, alpha=-1.0))
        atoms[j] = d
        flat_values[users] = g


def reinit_unused(residual: torch.Tensor, atoms: torch.Tensor, indices: torch.Tensor) -> int:
    """Point atoms that no code uses at the worst-represented signals (their
    normalised residual rows), so the next sparse coding can use them.
    Returns how many atoms were re-initialised."""
    k = atoms.shape[0]
    unused = torch.nonzero(torch.bincount(indices.flatten(), minlength=k) == 0).flatten()
    if unused.numel() == 0:
        return 0
    norms = residual.norm(dim=1)
    take = min(unused.numel(), residual.shape[0])
    worst = torch.topk(norms, take).indices
    for atom, row in zip(unused[:take].tolist(), worst.tolist()):
        if norms[row] > 0:
            atoms[atom] = residual[row] / norms[row]
    return take


def refresh_schedule(iterations: int, refresh: str | int) -> list[bool]:
    """Which alternations re-run OMP: "every" (each one, the plain K-SVD
    alternation), "doubling" (alternations 0, 1, 2, 4, 8, ... and the last),
    or an int m (every m-th alternation and the last)."""
    if refresh == "every":
        return [True] * iterations
    if refresh == "doubling":
        marks = {0, iterations - 1} | {2**i for i in range(int(math.log2(max(iterations, 1))) + 1)}
    elif isinstance(refresh, int) and refresh >= 1:
        marks = set(range(0, iterations, refresh)) | {iterations - 1}
    else:
        raise ValueError(f"refresh must be 'every', 'doubling' or a positive int, got {refresh!r}")
    return [i in marks for i in range(iterations)]


@dataclass
class DictionaryResult:
    dictionary: torch.Tensor  # (n, k), unit-norm atoms
    indices: torch.Tensor  # (B, s), int64
    values: torch.Tensor  # (B, s)
    errors: list[float] = field(default_factory=list)  # ||Y - D C|| / ||Y|| after each alternation
    omp_seconds: float = 0.0
    ksvd_seconds: float = 0.0
    reinitialised: int = 0


STARTS = ("svd", "refined", "signals")
START_HELP = ("how each dictionary fit starts: svd (the first k whitened singular directions, each output coded "
             "by its s largest coefficients on them; the fit only improves on that start), refined (that start "
             "improved by a short alternation with least-squares atoms, as --estimate refined prices it) or "
             "signals (k random whitened weight rows)")


def svd_start(Yt: torch.Tensor, atoms: int, sparsity: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A dictionary start from the SVD of the signals Yt (B x dim, one per row): the first ``atoms`` right
    singular vectors (unit-norm rows, orthonormal), and for each signal its ``sparsity`` largest
    coefficients on them, which in an orthonormal dictionary is the best code on that many atoms (no OMP
    needed). Returns (r x dim dictionary, indices, values) in float64, r = min(atoms, rank dimension): with
    more atoms than that, the caller fills the rest, and with ``sparsity`` above r the codes hold r entries."""
    U, S, Vh = torch.linalg.svd(Yt.to(torch.float64), full_matrices=False)
    r = min(atoms, Vh.shape[0])
    coeffs = U[:, :r] * S[:r]
    s = min(sparsity, r)
    indices = torch.topk(coeffs.abs(), s, dim=1).indices
    return Vh[:r], indices, coeffs.gather(1, indices)


def improve_code(Y: torch.Tensor, codes: torch.Tensor, atoms: torch.Tensor, sparsity: int, rounds: int = 2,
                 steps: int = 5) -> tuple[float, torch.Tensor, torch.Tensor]:
    """A short alternation on Y (signals x dim) ~ codes (signals x k, ``sparsity`` nonzeros per row) @ atoms
    (k x dim), cheaper than OMP and K-SVD: least-squares atoms for the codes (MOD), then ``rounds`` times
    each row's support re-chosen as its ``sparsity`` largest least-squares coefficients on the atoms, the
    values on it improved by ``steps`` projected-gradient steps (step 1 / the largest eigenvalue of the
    atoms' Gram, so no step increases the error), and the atoms re-fitted. Returns the best (squared
    residual, codes, atoms) met, the start included: never worse than the start. Float64."""
    Y, codes, atoms = Y.double(), codes.double(), atoms.double()
    s = min(sparsity, atoms.shape[0])
    energy = float(Y.square().sum())
    # Residuals from the products at hand (k x k and m x k or k x n), never a second m x k x n product:
    # ||Y - C A||^2 = ||Y||^2 - 2 <C, Y A^T> + <C A A^T, C> = ||Y||^2 - 2 <C^T Y, A> + <C^T C, A A^T>.
    # The terms cancel: a residual is exact to about eps x ||Y||^2 (relative errors under ~1e-8 are noise,
    # clamped at 0), far below what distinguishes two options.

    def with_codes(c: torch.Tensor, gram: torch.Tensor, target: torch.Tensor) -> float:
        return max(energy - 2.0 * float((c * target).sum()) + float(((c @ gram) * c).sum()), 0.0)

    def with_atoms(ctc: torch.Tensor, cty: torch.Tensor, a: torch.Tensor) -> float:
        return max(energy - 2.0 * float((cty * a).sum()) + float((ctc * (a @ a.T)).sum()), 0.0)

    def ridge(gram: torch.Tensor) -> torch.Tensor:  # unused atoms leave the Gram singular
        scale = max(float(gram.diagonal().mean()), 1e-300)
        return gram + 1e-10 * scale * torch.eye(gram.shape[0], dtype=gram.dtype)

    def fit_atoms(c: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Least-squares atoms for the codes ``c`` and their residual."""
        ctc, cty = c.T @ c, c.T @ Y
        a = torch.linalg.solve(ridge(ctc), cty)
        return a, with_atoms(ctc, cty, a)

    best = (with_codes(codes, atoms @ atoms.T, Y @ atoms.T), codes, atoms)

    def consider(r: float, c: torch.Tensor, a: torch.Tensor) -> None:
        nonlocal best
        if r < best[0]:
            best = (r, c, a)

    atoms, r = fit_atoms(codes)
    consider(r, codes, atoms)
    for _ in range(rounds):
        gram = atoms @ atoms.T
        target = Y @ atoms.T
        codes = torch.linalg.solve(ridge(gram), target.T).T
        support = torch.zeros_like(codes).scatter_(1, codes.abs().topk(s, dim=1).indices, 1.0)
        codes = codes * support
        step = 1.0 / max(float(torch.linalg.eigvalsh(gram)[-1]), 1e-300)
        for _ in range(steps):
            codes = (codes - step * (codes @ gram - target)) * support
        consider(with_codes(codes, gram, target), codes, atoms)
        atoms, r = fit_atoms(codes)
        consider(r, codes, atoms)
    return best


def refined_start(Yt: torch.Tensor, atoms: int, sparsity: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``svd_start`` improved by ``improve_code``: (r x dim unit-norm dictionary, indices, values), float64."""
    first, idx, val = svd_start(Yt, atoms, sparsity)
    codes = torch.zeros(Yt.shape[0], first.shape[0], dtype=torch.float64).scatter_(1, idx, val)
    _, codes, top = improve_code(Yt, codes, first, sparsity)
    unused = codes.abs().sum(0) == 0  # least squares leaves these atoms zero: keep the singular directions
    top = torch.where(unused[:, None], first, top)
    norms = top.norm(dim=1).clamp_min(1e-30)
    top, codes = top / norms[:, None], codes * norms
    idx = codes.abs().topk(idx.shape[1], dim=1).indices
    return top, idx, codes.gather(1, idx)


def learn_dictionary(Y: torch.Tensor, atoms: int, sparsity: int, iterations: int = 60, *,
                     refresh: str | int = "every", power_iterations: int = 2, seed: int = 0,
                     dtype: torch.dtype = torch.float32, omp_chunk: int | None = None,
                     start: str = "svd") -> DictionaryResult:
    """Alternate Batch-OMP and K-SVD to fit Y (n x B) ~ D C with ``sparsity`` nonzeros per column.

    ``start="svd"`` starts from ``svd_start``: the first ``atoms`` left
    singular vectors of Y with every column coded by its ``sparsity`` largest
    coefficients (exactly the error ``methods.auto`` prices a dictionary
    option by; no alternation increases it), any atoms beyond Y's rank as
    below; ``start="refined"`` from ``refined_start``, that code improved by
    ``improve_code``. ``start="signals"`` starts from ``atoms`` distinct random columns of Y
    (normalised; random directions for any beyond B or for zero columns),
    seeded. When n > B the problem is solved in the coordinates of an
    orthonormal basis of Y's column space, which holds every atom K-SVD can
    produce, and mapped back. Each alternation is a sparse coding (on the
    ``refresh`` schedule, see ``refresh_schedule``) followed by a K-SVD sweep.
    """
    if Y.ndim != 2:
        raise ValueError(f"Y must be 2-D, got shape {tuple(Y.shape)}")
    if not 1 <= sparsity <= atoms:
        raise ValueError(f"need 1 <= sparsity <= atoms, got sparsity {sparsity} and atoms {atoms}")
    if iterations < 1:
        raise ValueError(f"iterations must be at least 1, got {iterations}")
    if start not in STARTS:
        raise ValueError(f"start must be one of {', '.join(STARTS)}, got {start!r}")
    schedule = refresh_schedule(iterations, refresh)
    n, B = Y.shape
    basis = None
    Yw = Y.to(torch.float64)
    if n > B:
        basis, Yw = torch.linalg.qr(Yw)  # Y = basis @ Yw, Yw (B x B)
    scale = float(Yw.norm()) or 1.0
    Yw = Yw / scale
    first = {"svd": svd_start, "refined": refined_start}[start](Yw.T, atoms, sparsity) if start != "signals" else None
    Yw = Yw.to(dtype)
    dim = Yw.shape[0]

    gen = torch.Generator().manual_seed(seed)  # on the CPU: the same start on every device
    Yt = Yw.T.contiguous()  # (B, dim): one signal per row
    D = torch.randn(atoms, dim, generator=gen, dtype=torch.float64).to(Y.device, dtype)  # one atom per row
    picked = torch.randperm(B, generator=gen)[: min(atoms, B)].to(Y.device)
    D[: picked.numel()] = Yt[picked]
    norms = D.norm(dim=1)
    zero = norms <= 1e-12 * float(norms.max())
    if bool(zero.any()):
        D[zero] = torch.randn(int(zero.sum()), dim, generator=gen, dtype=torch.float64).to(Y.device, dtype)
        norms = D.norm(dim=1)
    D /= norms[:, None]

    result = DictionaryResult(D, torch.empty(0), torch.empty(0))
    indices = values = residual = None
    if first is not None:
        top, idx, val = first
        D[: top.shape[0]] = top.to(D)
        if idx.shape[1] == sparsity:  # every signal coded already: the first alternation needs no OMP
            indices, values = idx, val.to(dtype)
            residual = Yt - codes_to_dense(indices, values, atoms).T @ D
            schedule[0] = False
    total = float(Yt.square().sum())
    for recode in schedule:
        if recode:
            t = time.perf_counter()
            new_idx, new_val = batch_omp(D @ D.T, Yt @ D.T, sparsity, chunk=omp_chunk)
            new_res = Yt - codes_to_dense(new_idx, new_val, atoms).T @ D
            if indices is None:
                indices, values, residual = new_idx, new_val, new_res
            else:  # keep, per signal, whichever code fits better now
                better = new_res.square().sum(1) < residual.square().sum(1)
                indices[better], values[better] = new_idx[better], new_val[better]
                residual[better] = new_res[better]
            result.omp_seconds += time.perf_counter() - t
        t = time.perf_counter()
        ksvd_sweep(residual, D, indices, values, power_iterations)
        result.reinitialised += reinit_unused(residual, D, indices)
        result.ksvd_seconds += time.perf_counter() - t
        result.errors.append(math.sqrt(max(float(residual.square().sum()), 0.0) / total) if total else 0.0)

    D64 = D.T.to(torch.float64)
    if basis is not None:
        D64 = basis @ D64
    result.dictionary = D64
    result.indices = indices
    result.values = values.to(torch.float64) * scale
    return result


@dataclass
class DictionaryFactors:
    """W' = codes.T @ atoms: ``atoms`` (k x in) in the original input space and,
    per output row, ``indices`` / ``values`` (out x s) into the atoms."""

    atoms: torch.Tensor  # (k, in)
    indices: torch.Tensor  # (out, s)
    values: torch.Tensor  # (out, s)
    errors: list[float]  # relative (whitened) error after each alternation
    shift: float = 0.0  # diagonal shift the Cholesky factor needed
    omp_seconds: float = 0.0
    ksvd_seconds: float = 0.0

    def dense(self) -> torch.Tensor:
        """The (out x in) approximation."""
        k = self.atoms.shape[0]
        return codes_to_dense(self.indices, self.values, k).T @ self.atoms


def sparse_dictionary(weights: list[torch.Tensor], atoms: int, sparsity: int, gram: torch.Tensor | None = None,
                      eps: float = 1e-6, **options) -> list[DictionaryFactors]:
    """CoSpaDi's factorization of one or more (out_i x in) weights sharing one dictionary.

    With ``gram`` = X.T X (in x in) the problem is whitened: with L L.T = G
    (Cholesky, diagonal shifted if needed), Y = L.T [W_1.T, W_2.T, ...] and the
    fitted error ||Y - D C||_F equals the calibration output error
    sum_i ||X W_i.T - X W'_i.T||^2 (square-rooted). Without ``gram`` it is plain
    dictionary learning on the weights. The dictionary returned is
    L^-T D, rescaled to unit-norm atoms with the codes scaled to match.
    ``options`` go to ``learn_dictionary``.
    """
    if not weights:
        raise ValueError("need at least one weight")
    n = weights[0].shape[1]
    if any(w.ndim != 2 or w.shape[1] != n for w in weights):
        raise ValueError("all weights must be 2-D with the same number of input features")
    Wt = torch.cat([w.detach().to(torch.float64).T for w in weights], dim=1)  # (in, sum out)
    shift, L = 0.0, None
    if gram is not None:
        if gram.shape != (n, n):
            raise ValueError(f"gram must have shape {(n, n)}, got {tuple(gram.shape)}")
        chol = cholesky_factor(gram, eps)
        L, shift = chol.factor, chol.shift
        Wt = L.T @ Wt
    fit = learn_dictionary(Wt, atoms, sparsity, **options)
    D = fit.dictionary
    if L is not None:  # D_orig = L^-T D: solve L.T X = D
        D = torch.linalg.solve_triangular(L.T, D, upper=True)
    norms = D.norm(dim=0).clamp_min(1e-30)
    D = D / norms
    values = fit.values * norms[fit.indices]
    out, start = [], 0
    for w in weights:
        rows = slice(start, start + w.shape[0])
        start += w.shape[0]
        out.append(DictionaryFactors(D.T.contiguous(), fit.indices[rows], values[rows], fit.errors, shift,
                                     fit.omp_seconds, fit.ksvd_seconds))
    return out


def dictionary_budget(in_features: int, out_features: int, ratio: float, rho: float = 2.0, *,
                      layers: int = 1, count: str = "params", value_bits: int = 16) -> tuple[int, int]:
    """Atoms k and nonzeros per column s for removing ``ratio`` of ``layers`` (out x in) matrices.

    A dictionary shared by the layers stores in*k numbers and each layer's codes
    s*out values, s = floor(k / rho).
    count="params" counts numbers only (the paper's count):
        k = floor((1 - ratio) * layers * in * out / (in + layers * out / rho)).
    count="storage" also counts the support of the codes, stored as one bit per
    (atom, output) pair (k*out bits per layer; cheaper than indices for
    rho < log2 k), against dense weights of ``value_bits`` bits:
        k = floor((1 - ratio) * layers * in * out * b / ((in + layers * out / rho) * b + layers * out)).
    """
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio must lie in (0, 1), got {ratio}")
    if rho < 1.0:
        raise ValueError(f"rho = atoms / sparsity must be at least 1, got {rho}")
    g, m, n = layers, out_features, in_features
    if count == "params":
        k = math.floor((1.0 - ratio) * g * n * m / (n + g * m / rho))
    elif count == "storage":
        b = value_bits
        k = math.floor((1.0 - ratio) * g * n * m * b / ((n + g * m / rho) * b + g * m))
    else:
        raise ValueError(f"count must be 'params' or 'storage', got {count!r}")
    return k, math.floor(k / rho)


def solve_cost(in_features: int, out_features: int, atoms: int, sparsity: int, *, layers: int = 1) -> float:
    """Roughly the multiply-adds of fitting a dictionary shared by ``layers`` (out x in) matrices: OMP (k s^2
    per output) and the K-SVD sweeps; what ``parallel.Team`` balances the solves by."""
    rows = out_features * layers
    return float(atoms * sparsity * (sparsity * rows + in_features + rows))


def dictionary_cost(in_features: int, out_features: int, atoms: int, sparsity: int, *, layers: int = 1,
                    value_bits: int = 16) -> tuple[int, int]:
    """(numbers stored, bits stored) by a dictionary shared by ``layers`` matrices and their codes."""
    numbers = in_features * atoms + layers * out_features * sparsity
    return numbers, numbers * value_bits + layers * out_features * atoms
