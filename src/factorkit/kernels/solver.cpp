// CoSpaDi's dictionary solver on the CPU (solvers.dictionary): Batch-OMP and the K-SVD sweep, each the
// same steps as the torch version without the dozen dispatched tensor operations per step that, at
// CoSpaDi's sizes (k ~ 500 atoms, s ~ 250 nonzeros, ~1500 signals), cost more than the arithmetic.
//
// Batch-OMP. Input: G = D.T D (k x k, unit-norm atoms) and the correlations D.T y of each signal (B x k).
// For each signal, step t picks the unused atom j with the largest |alpha_j| (alpha = D.T r, r the
// residual; the first such atom on a tie, as torch's argmax), forms v = G[j] - P[:t].T P[:t, j] (P[i] =
// D.T q_i, q_i the orthonormalised atom i), norm = sqrt(v[j]), P[t] = v / norm, c_t = alpha_j / norm and
// alpha -= c_t P[t]. An atom whose v[j] is at most `tiny` (numerically a combination of those chosen) gets
// P[t] = 0 and c_t = 0: it stays in the support with coefficient 0. The coefficients x solve the
// upper-triangular system L.T x = c with L.T[i, t] = P[i, j_t] (i < t) and L.T[t, t] = norm_t. The work
// is sum_t t k = k s^2 / 2 multiply-adds per signal, all in v -= P[:t].T w, done four rows of P at a time
// so v is read and written once per four (the compiler vectorises the row loop). A signal's P (s x k) is
// its own buffer, so it stays in the core's cache while it is coded; signals are spread over torch's
// intra-op threads, and the thread count changes no bit.
//
// K-SVD sweep. Atoms one after the other (each update changes the residual the next one sees): for atom
// j with users w (the codes that hold it, in increasing position, as torch's stable argsort orders them),
// E = residual[w] + g d.T with g their coefficients and d the atom, then `power` power iterations
// d = E.T g / |E.T g| (kept when that is 0), g = E d, and residual[w] = E - g d.T. The rows of E are
// spread over the threads; E.T g is summed by column ranges, so the thread count changes no bit either.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

// sum_c a[c] b[c] in 16 interleaved partial sums, which the compiler keeps in vector registers (a single
// running sum is a chain of dependent adds it may not reorder): a fixed order, whatever the thread count.
template <typename T>
T dot(const T* __restrict a, const T* __restrict b, int64_t n) {
  constexpr int W = 16;
  T part[W] = {};
  int64_t c = 0;
  for (; c + W <= n; c += W)
    for (int i = 0; i < W; ++i) part[i] += a[c + i] * b[c + i];
  T acc = 0;
  for (; c < n; ++c) acc += a[c] * b[c];
  for (int i = 0; i < W; ++i) acc += part[i];
  return acc;
}

template <typename T>
void code_signal(const T* __restrict G, const T* __restrict corr, int64_t k, int64_t s, T tiny,
                 T* __restrict P, T* __restrict alpha, T* __restrict v, uint8_t* __restrict used,
                 int64_t* __restrict chosen, T* __restrict proj, T* __restrict norms, int64_t* __restrict out_idx,
                 T* __restrict out_val) {
  for (int64_t i = 0; i < k; ++i) {
    alpha[i] = corr[i];
    used[i] = 0;
  }
  for (int64_t t = 0; t < s; ++t) {
    int64_t j = -1;
    T best = T(-1);
    for (int64_t i = 0; i < k; ++i) {  // used atoms score -1, as the torch version's masked_fill
      const T score = used[i] ? T(-1) : std::abs(alpha[i]);
      if (score > best) {
        best = score;
        j = i;
      }
    }
    const T* g = G + j * k;
    for (int64_t i = 0; i < k; ++i) v[i] = g[i];
    int64_t i = 0;
    for (; i + 4 <= t; i += 4) {
      const T* p0 = P + i * k;
      const T* p1 = p0 + k;
      const T* p2 = p1 + k;
      const T* p3 = p2 + k;
      const T w0 = p0[j], w1 = p1[j], w2 = p2[j], w3 = p3[j];
      for (int64_t x = 0; x < k; ++x) v[x] -= w0 * p0[x] + w1 * p1[x] + w2 * p2[x] + w3 * p3[x];
    }
    for (; i < t; ++i) {
      const T* p = P + i * k;
      const T w = p[j];
      for (int64_t x = 0; x < k; ++x) v[x] -= w * p[x];
    }
    const T norm2 = v[j];
    const T norm = std::sqrt(norm2 > tiny ? norm2 : tiny);
    const T scale = norm2 > tiny ? T(1) / norm : T(0);
    T* pt = P + t * k;
    for (int64_t x = 0; x < k; ++x) pt[x] = v[x] * scale;
    const T c = alpha[j] * scale;
    for (int64_t x = 0; x < k; ++x) alpha[x] -= c * pt[x];
    used[j] = 1;
    chosen[t] = j;
    proj[t] = c;
    norms[t] = norm;
  }
  for (int64_t t = s - 1; t >= 0; --t) {  // back substitution in L.T x = c
    const T* pt = P + t * k;
    T acc = proj[t];
    for (int64_t u = t + 1; u < s; ++u) acc -= pt[chosen[u]] * out_val[u];
    out_val[t] = acc / norms[t];
  }
  for (int64_t t = 0; t < s; ++t) out_idx[t] = chosen[t];
}

}  // namespace

// (indices (B x s, int64), values (B x s)) of every signal's code; gram (k x k) and correlations (B x k)
// contiguous, of one floating dtype.
std::vector<torch::Tensor> batch_omp(torch::Tensor gram, torch::Tensor correlations, int64_t sparsity,
                                     double tiny) {
  TORCH_CHECK(gram.device().is_cpu() && correlations.device().is_cpu(), "batch_omp: CPU tensors only");
  TORCH_CHECK(gram.dim() == 2 && correlations.dim() == 2 && gram.size(0) == gram.size(1) &&
                  correlations.size(1) == gram.size(0),
              "batch_omp: gram must be (k, k) and correlations (B, k)");
  TORCH_CHECK(gram.scalar_type() == correlations.scalar_type(), "batch_omp: gram and correlations differ in dtype");
  const int64_t k = gram.size(0), B = correlations.size(0), s = sparsity;
  TORCH_CHECK(1 <= s && s <= k, "batch_omp: sparsity must lie in [1, k]");
  gram = gram.contiguous();
  correlations = correlations.contiguous();
  auto indices = torch::empty({B, s}, correlations.options().dtype(torch::kLong));
  auto values = torch::empty({B, s}, correlations.options());
  AT_DISPATCH_FLOATING_TYPES(correlations.scalar_type(), "batch_omp", [&] {
    const scalar_t* G = gram.data_ptr<scalar_t>();
    const scalar_t* C = correlations.data_ptr<scalar_t>();
    int64_t* I = indices.data_ptr<int64_t>();
    scalar_t* V = values.data_ptr<scalar_t>();
    const scalar_t t = static_cast<scalar_t>(tiny);
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> P(s * k), alpha(k), v(k), proj(s), norms(s);
      std::vector<uint8_t> used(k);
      std::vector<int64_t> chosen(s);
      for (int64_t b = begin; b < end; ++b)
        code_signal<scalar_t>(G, C + b * k, k, s, t, P.data(), alpha.data(), v.data(), used.data(), chosen.data(),
                              proj.data(), norms.data(), I + b * s, V + b * s);
    });
  });
  return {indices, values};
}

// One K-SVD pass over all atoms, in place: residual (B x n), atoms (k x n), values (B x s) contiguous, of
// one floating dtype; indices (B x s, int64), each row's atoms distinct.
void ksvd_sweep(torch::Tensor residual, torch::Tensor atoms, torch::Tensor indices, torch::Tensor values,
                int64_t power) {
  TORCH_CHECK(residual.device().is_cpu() && atoms.device().is_cpu() && values.device().is_cpu(),
              "ksvd_sweep: CPU tensors only");
  TORCH_CHECK(residual.is_contiguous() && atoms.is_contiguous() && values.is_contiguous(),
              "ksvd_sweep: residual, atoms and values must be contiguous (they are updated in place)");
  TORCH_CHECK(residual.scalar_type() == atoms.scalar_type() && atoms.scalar_type() == values.scalar_type(),
              "ksvd_sweep: residual, atoms and values differ in dtype");
  const int64_t B = residual.size(0), n = residual.size(1), k = atoms.size(0), s = indices.size(1);
  TORCH_CHECK(atoms.size(1) == n && indices.size(0) == B && values.size(0) == B && values.size(1) == s,
              "ksvd_sweep: residual (B, n), atoms (k, n), indices and values (B, s)");
  auto idx = indices.to(torch::kLong).contiguous();
  const int64_t* I = idx.data_ptr<int64_t>();
  const int64_t total = B * s;
  std::vector<int64_t> start(k + 1, 0), order(total);
  for (int64_t p = 0; p < total; ++p) {
    TORCH_CHECK(0 <= I[p] && I[p] < k, "ksvd_sweep: an index lies outside the atoms");
    ++start[I[p] + 1];
  }
  for (int64_t j = 0; j < k; ++j) start[j + 1] += start[j];
  {
    std::vector<int64_t> next(start.begin(), start.end() - 1);
    for (int64_t p = 0; p < total; ++p) order[next[I[p]]++] = p;
  }
  const int64_t row_grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1));
  AT_DISPATCH_FLOATING_TYPES(residual.scalar_type(), "ksvd_sweep", [&] {
    scalar_t* R = residual.data_ptr<scalar_t>();
    scalar_t* A = atoms.data_ptr<scalar_t>();
    scalar_t* V = values.data_ptr<scalar_t>();
    std::vector<scalar_t> E, g, d(n), dn(n);
    for (int64_t j = 0; j < k; ++j) {
      const int64_t* users = order.data() + start[j];
      const int64_t m = start[j + 1] - start[j];
      if (m == 0) continue;
      E.resize(m * n);
      g.resize(m);
      std::copy(A + j * n, A + (j + 1) * n, d.begin());
      at::parallel_for(0, m, row_grain, [&](int64_t begin, int64_t end) {
        for (int64_t u = begin; u < end; ++u) {
          const scalar_t gu = V[users[u]];
          const scalar_t* r = R + (users[u] / s) * n;
          scalar_t* e = E.data() + u * n;
          g[u] = gu;
          for (int64_t c = 0; c < n; ++c) e[c] = r[c] + gu * d[c];
        }
      });
      for (int64_t it = 0; it < power; ++it) {
        at::parallel_for(0, n, 64, [&](int64_t c0, int64_t c1) {  // dn = E.T g, by column ranges
          for (int64_t c = c0; c < c1; ++c) dn[c] = 0;
          for (int64_t u = 0; u < m; ++u) {
            const scalar_t gu = g[u];
            const scalar_t* e = E.data() + u * n;
            for (int64_t c = c0; c < c1; ++c) dn[c] += gu * e[c];
          }
        });
        const scalar_t norm2 = dot(dn.data(), dn.data(), n);
        if (norm2 > 0) {
          const scalar_t inv = scalar_t(1) / std::sqrt(norm2);
          for (int64_t c = 0; c < n; ++c) d[c] = dn[c] * inv;
        }
        at::parallel_for(0, m, row_grain, [&](int64_t begin, int64_t end) {
          for (int64_t u = begin; u < end; ++u) {
            g[u] = dot(E.data() + u * n, d.data(), n);
          }
        });
      }
      at::parallel_for(0, m, row_grain, [&](int64_t begin, int64_t end) {
        for (int64_t u = begin; u < end; ++u) {
          const scalar_t gu = g[u];
          const scalar_t* e = E.data() + u * n;
          scalar_t* r = R + (users[u] / s) * n;
          for (int64_t c = 0; c < n; ++c) r[c] = e[c] - gu * d[c];
          V[users[u]] = gu;
        }
      });
      std::copy(d.begin(), d.end(), A + j * n);
    }
  });
}
