// The product of a few tokens with a weight quantized to 8-bit integers, reading the integers themselves.
//
//   y[t, n] = sum over k of x[t, k] * q[n, k] * scale[n, k / group]
//
// q (out x in, int8) holds torchao's integers: int8 with one scale per row (group = in), or int4 values
// kept one per byte with one scale per `group` numbers of a row; symmetric (no zero point). torch's own
// path converts the whole of q to float for every product, which for one token costs more than the float
// layer it replaces; this reads each integer once. Rows are spread over torch's intra-op threads and
// tokens taken in tiles of up to 4, so a row's integers come from memory once per tile. With AVX-512 16
// integers are widened to floats per step (vpmovsxbd + vcvtdq2ps), scaled by their group's scale (with one
// scale per row: once, at the end) and multiplied into two accumulators per token; AVX2 does 8 per step;
// other CPUs a scalar loop.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define FKQ_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define FKQ_AVX2 1
#endif

namespace {

constexpr int kTokens = 4;

// acc[t] = sum_k x[t*ldx + k] * q[k] * scale[k / group] for k in [0, in), t < nt.
template <int NT>
void row(const int8_t* q, const float* scale, int64_t group, const float* x, int64_t ldx, int64_t in,
         float* out) {
#if defined(FKQ_AVX512)
  // two accumulator chains per token (the multiply-adds of one chain wait on each other); with one scale
  // per row the integers are summed unscaled and the row's scale applied once at the end
  const bool per_row = group == in;
  __m512 acc[NT], acc2[NT];
  for (int t = 0; t < NT; ++t) acc[t] = acc2[t] = _mm512_setzero_ps();
  auto widen = [&](__m128i b, __m512 s) {
    const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
    return per_row ? w : _mm512_mul_ps(w, s);
  };
  for (int64_t g0 = 0; g0 < in; g0 += group) {
    const __m512 s = _mm512_set1_ps(scale[g0 / group]);
    const int64_t g1 = std::min(in, g0 + group);
    int64_t k = g0;
    for (; k + 32 <= g1; k += 32) {
      const __m512 w0 = widen(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k)), s);
      const __m512 w1 = widen(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k + 16)), s);
      for (int t = 0; t < NT; ++t) {
        acc[t] = _mm512_fmadd_ps(_mm512_loadu_ps(x + t * ldx + k), w0, acc[t]);
        acc2[t] = _mm512_fmadd_ps(_mm512_loadu_ps(x + t * ldx + k + 16), w1, acc2[t]);
      }
    }
    for (; k + 16 <= g1; k += 16) {
      const __m512 w = widen(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k)), s);
      for (int t = 0; t < NT; ++t) acc[t] = _mm512_fmadd_ps(_mm512_loadu_ps(x + t * ldx + k), w, acc[t]);
    }
    if (k < g1) {
      const __mmask16 m = static_cast<__mmask16>((1u << (g1 - k)) - 1);
      const __m512 w = widen(_mm_maskz_loadu_epi8(m, q + k), s);
      for (int t = 0; t < NT; ++t) acc[t] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, x + t * ldx + k), w, acc[t]);
    }
  }
  const float row_scale = per_row ? scale[0] : 1.f;
  for (int t = 0; t < NT; ++t) out[t] = _mm512_reduce_add_ps(_mm512_add_ps(acc[t], acc2[t])) * row_scale;
#elif defined(FKQ_AVX2)
  __m256 acc[NT];
  for (int t = 0; t < NT; ++t) acc[t] = _mm256_setzero_ps();
  float tail[NT] = {};
  for (int64_t g0 = 0; g0 < in; g0 += group) {
    const float sf = scale[g0 / group];
    const __m256 s = _mm256_set1_ps(sf);
    const int64_t g1 = std::min(in, g0 + group);
    int64_t k = g0;
    for (; k + 8 <= g1; k += 8) {
      const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + k));
      const __m256 w = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), s);
      for (int t = 0; t < NT; ++t) acc[t] = _mm256_fmadd_ps(_mm256_loadu_ps(x + t * ldx + k), w, acc[t]);
    }
    for (; k < g1; ++k)
      for (int t = 0; t < NT; ++t) tail[t] += x[t * ldx + k] * (static_cast<float>(q[k]) * sf);
  }
  for (int t = 0; t < NT; ++t) {
    __m128 v = _mm_add_ps(_mm256_castps256_ps128(acc[t]), _mm256_extractf128_ps(acc[t], 1));
    v = _mm_add_ps(v, _mm_movehl_ps(v, v));
    v = _mm_add_ss(v, _mm_movehdup_ps(v));
    out[t] = _mm_cvtss_f32(v) + tail[t];
  }
#else
  for (int t = 0; t < NT; ++t) {
    float a = 0.f;
    for (int64_t k = 0; k < in; ++k) a += x[t * ldx + k] * (static_cast<float>(q[k]) * scale[k / group]);
    out[t] = a;
  }
#endif
}

}  // namespace

namespace {

void check_xq(const torch::Tensor& x, const torch::Tensor& q) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(),
              "x must be a contiguous (tokens x in) float32 matrix");
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == torch::kInt8 && q.is_contiguous(),
              "q must be a contiguous (out x in) int8 matrix");
  TORCH_CHECK(q.size(1) == x.size(1), "q must have as many columns as x");
}

// y[t, n] for rows n in [begin, end) with their scales `sn(n)`, `group` numbers per scale.
template <typename S>
void rows(const float* xp, int64_t tokens, int64_t in, const int8_t* qp, S sn, int64_t group, float* yp,
          int64_t out, int64_t begin, int64_t end) {
  float acc[kTokens];
  for (int64_t n = begin; n < end; ++n) {
    for (int64_t t0 = 0; t0 < tokens; t0 += kTokens) {
      const int nt = static_cast<int>(std::min<int64_t>(kTokens, tokens - t0));
      const float* xt = xp + t0 * in;
      const int8_t* qn = qp + n * in;
      switch (nt) {
        case 1: row<1>(qn, sn(n), group, xt, in, in, acc); break;
        case 2: row<2>(qn, sn(n), group, xt, in, in, acc); break;
        case 3: row<3>(qn, sn(n), group, xt, in, in, acc); break;
        default: row<4>(qn, sn(n), group, xt, in, in, acc); break;
      }
      for (int t = 0; t < nt; ++t) yp[(t0 + t) * out + n] = acc[t];
    }
  }
}

}  // namespace

// A weight quantized in groups down its columns (torchao block (group, 1): rows g*group .. g*group+group-1
// share one scale per column, scale: (out / group, in) float32), as factorkit.quantize stores int4 factors
// whose rows do not split into groups (a low-rank U of rank r, out x r): x is scaled by each row group's
// scales once (tokens x in numbers, few next to the group's integers), then the rows run as with one scale
// per row of 1.
torch::Tensor int8_colgroups(torch::Tensor x, torch::Tensor q, torch::Tensor scale, int64_t group) {
  check_xq(x, q);
  const int64_t tokens = x.size(0), in = x.size(1), out = q.size(0);
  TORCH_CHECK(group >= 1 && out % group == 0, "group must divide the rows");
  TORCH_CHECK(scale.scalar_type() == torch::kFloat32 && scale.is_contiguous() && scale.numel() == (out / group) * in,
              "scale must hold (out / group) x in float32 numbers");
  auto y = torch::empty({tokens, out}, x.options());
  const float* xp = x.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float one = 1.f;
  at::parallel_for(0, out / group, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> xs(tokens * in);
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t t = 0; t < tokens; ++t)
        for (int64_t k = 0; k < in; ++k) xs[t * in + k] = xp[t * in + k] * sp[b * in + k];
      rows(xs.data(), tokens, in, qp, [&](int64_t) { return &one; }, in, yp, out, b * group, (b + 1) * group);
    }
  });
  return y;
}

// x: (tokens, in) float32; q: (out, in) int8; scale: (out, in / group) float32. Returns y: (tokens, out)
// float32.
torch::Tensor int8_rows(torch::Tensor x, torch::Tensor q, torch::Tensor scale, int64_t group) {
  check_xq(x, q);
  const int64_t tokens = x.size(0), in = x.size(1), out = q.size(0);
  TORCH_CHECK(group >= 1 && in % group == 0, "group must divide the columns");
  TORCH_CHECK(scale.scalar_type() == torch::kFloat32 && scale.is_contiguous() && scale.numel() == out * (in / group),
              "scale must hold out x (in / group) float32 numbers");
  auto y = torch::empty({tokens, out}, x.options());
  const float* xp = x.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t groups = in / group;
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, in));
  at::parallel_for(0, out, grain, [&](int64_t begin, int64_t end) {
    rows(xp, tokens, in, qp, [&](int64_t n) { return sp + n * groups; }, group, yp, out, begin, end);
  });
  return y;
}
