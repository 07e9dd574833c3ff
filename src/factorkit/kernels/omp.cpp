// Batch-OMP (solvers.dictionary.batch_omp) on the CPU, one signal at a time with no per-step dispatch.
//
// Input: G = D.T D (k x k, unit-norm atoms) and the correlations D.T y of each signal (B x k). For each
// signal, step t picks the unused atom j with the largest |alpha_j| (alpha = D.T r, r the residual; the
// first such atom on a tie, as torch's argmax), forms v = G[j] - P[:t].T P[:t, j] (P[i] = D.T q_i, q_i the
// orthonormalised atom i), norm = sqrt(v[j]), P[t] = v / norm, c_t = alpha_j / norm and alpha -= c_t P[t].
// An atom whose v[j] is at most `tiny` (numerically a combination of those chosen) gets P[t] = 0 and
// c_t = 0: it stays in the support with coefficient 0. The coefficients x solve the upper-triangular
// system L.T x = c with L.T[i, t] = P[i, j_t] (i < t) and L.T[t, t] = norm_t.
//
// The work is sum_t t k = k s^2 / 2 multiply-adds per signal, all in v -= P[:t].T w, done four rows of P
// at a time so v is read and written once per four (the compiler vectorises the row loop). A signal's P
// (s x k) is its own buffer, so it stays in the core's cache while it is coded; signals are spread over
// torch's intra-op threads. The torch version issues a dozen small tensor operations per step for a chunk
// of signals, and at CoSpaDi's sizes (k ~ 500, s ~ 250) their dispatch costs more than the arithmetic.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace {

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
