// The code product of DictionaryLinear on the CPU, reading only what the module stores.
//
//   y[t, o] = sum over the atoms j in row o's support of values[o, rank of j] * h[t, g(o) * atoms + j]
//
// h = x @ atoms.T (tokens x blocks*atoms, float32) is computed by torch's GEMM before this call; the
// support is the packed bit mask (out x ceil(atoms/8) bytes, bit j%8 of byte j/8), the values (out x s,
// float32 or bfloat16) are in increasing atom order, and g(o) = o / (out / blocks) is the row's group
// (DSFormer's row blocks; 0 when blocks = 1). No index is ever materialised: with AVX-512 each 16 bits of
// the mask expand the row's next popcount values into a 16-lane vector (vexpandps) that multiplies the
// matching 16 entries of h; with AVX2 each mask byte picks its values into 8 lanes through a permute table;
// without either a scalar loop walks the set bits. Rows are spread over torch's intra-op threads, tokens are
// taken in tiles of up to 8 (4 with AVX2; one accumulator each) so the row's mask and values are read from
// memory once per tile, from cache after the first. For more tokens the lanes kernel (mask_codes_lanes, both
// vector builds) puts the tokens in the vector lanes instead: one multiply-add per stored value and vector.
// Values that factorkit.quantize left as int8 numbers with float scales are read as such (mask_codes_int8):
// each row is widened into a small float buffer once and the same row kernels read it from there.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define FK_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define FK_AVX2 1
#endif

namespace {

#ifdef FK_AVX2
constexpr int kTile = 4;  // 16 ymm registers: 2 x 4 accumulators, the values and h
#else
constexpr int kTile = 8;
#endif

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline float load_value(const float* v, int64_t i) { return v[i]; }
inline float load_value(const uint16_t* v, int64_t i) { return bf16_to_float(v[i]); }

// Scalar: walk the set bits of the row's mask, tokens t0 .. t0+nt-1.
template <typename V>
void row_scalar(const uint8_t* mask, int64_t nbytes, const V* v, const float* h, int64_t hstride, int nt,
                float* acc) {
  for (int t = 0; t < nt; ++t) acc[t] = 0.f;
  int64_t i = 0;
  for (int64_t b = 0; b < nbytes; ++b) {
    unsigned m = mask[b];
    while (m) {
      const int64_t j = b * 8 + __builtin_ctz(m);
      const float value = load_value(v, i++);
      for (int t = 0; t < nt; ++t) acc[t] += value * h[t * hstride + j];
      m &= m - 1;
    }
  }
}

#ifdef FK_AVX512
// The next popcount(m) values of the row, zero-extended to 16 float lanes.
inline __m512 load_packed(const float* v, int count) {
  return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << count) - 1u), v);
}
inline __m512 load_packed(const uint16_t* v, int count) {
  const __m256i raw = _mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << count) - 1u), v);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

template <typename V, int NT>
void row_avx512(const uint8_t* mask, int64_t atoms, const V* v, const float* h, int64_t hstride, float* out) {
  // two accumulators per token, for even and odd blocks of 16 atoms: one chain of dependent multiply-adds
  // would wait out the FMA latency on every block when there are few tokens
  __m512 acc[NT], odd[NT];
  for (int t = 0; t < NT; ++t) acc[t] = odd[t] = _mm512_setzero_ps();
  const int64_t nbytes = (atoms + 7) / 8;
  int64_t j = 0;
  for (; j + 32 <= atoms; j += 32) {
    uint32_t bits;
    std::memcpy(&bits, mask + j / 8, 4);
    const uint16_t lo = static_cast<uint16_t>(bits), hi = static_cast<uint16_t>(bits >> 16);
    const int nlo = __builtin_popcount(lo), nhi = __builtin_popcount(hi);
    const __m512 vlo = _mm512_maskz_expand_ps(lo, load_packed(v, nlo));
    const __m512 vhi = _mm512_maskz_expand_ps(hi, load_packed(v + nlo, nhi));
    v += nlo + nhi;
    for (int t = 0; t < NT; ++t) {
      acc[t] = _mm512_fmadd_ps(vlo, _mm512_loadu_ps(h + t * hstride + j), acc[t]);
      odd[t] = _mm512_fmadd_ps(vhi, _mm512_loadu_ps(h + t * hstride + j + 16), odd[t]);
    }
  }
  for (; j + 16 <= atoms; j += 16) {
    uint16_t bits;
    std::memcpy(&bits, mask + j / 8, 2);
    if (!bits) continue;
    const int count = __builtin_popcount(bits);
    const __m512 vals = _mm512_maskz_expand_ps(bits, load_packed(v, count));
    v += count;
    for (int t = 0; t < NT; ++t) acc[t] = _mm512_fmadd_ps(vals, _mm512_loadu_ps(h + t * hstride + j), acc[t]);
  }
  if (j < atoms) {  // the last atoms % 16: one or two mask bytes, h read under a lane mask
    uint32_t bits = mask[j / 8];
    if (j / 8 + 1 < nbytes) bits |= static_cast<uint32_t>(mask[j / 8 + 1]) << 8;
    const __mmask16 lanes = static_cast<__mmask16>((1u << (atoms - j)) - 1u);
    bits &= lanes;
    const int count = __builtin_popcount(bits);
    const __m512 vals = _mm512_maskz_expand_ps(static_cast<__mmask16>(bits), load_packed(v, count));
    for (int t = 0; t < NT; ++t)
      acc[t] = _mm512_fmadd_ps(vals, _mm512_maskz_loadu_ps(lanes, h + t * hstride + j), acc[t]);
  }
  for (int t = 0; t < NT; ++t) out[t] = _mm512_reduce_add_ps(_mm512_add_ps(acc[t], odd[t]));
}

template <typename V>
void row_tile(const uint8_t* mask, int64_t atoms, const V* v, const V* /*end*/, const float* h, int64_t hstride,
              int nt, float* out) {
  switch (nt) {
    case 1: return row_avx512<V, 1>(mask, atoms, v, h, hstride, out);
    case 2: return row_avx512<V, 2>(mask, atoms, v, h, hstride, out);
    case 3: return row_avx512<V, 3>(mask, atoms, v, h, hstride, out);
    case 4: return row_avx512<V, 4>(mask, atoms, v, h, hstride, out);
    case 5: return row_avx512<V, 5>(mask, atoms, v, h, hstride, out);
    case 6: return row_avx512<V, 6>(mask, atoms, v, h, hstride, out);
    case 7: return row_avx512<V, 7>(mask, atoms, v, h, hstride, out);
    default: return row_avx512<V, 8>(mask, atoms, v, h, hstride, out);
  }
}
#elif defined(FK_AVX2)
// AVX2 has no expand: a table gives, for each mask byte, the lane of the packed values that every set bit
// takes (its rank among the set bits), with the sign bit set on the set lanes: a permute (which reads only the
// low three bits) puts the values in place and a blend on the sign bits zeroes the unset lanes.
struct RankTable {
  alignas(32) int32_t rank[256][8];
  RankTable() {
    for (int m = 0; m < 256; ++m)
      for (int i = 0; i < 8; ++i)
        rank[m][i] = (m >> i & 1) ? static_cast<int32_t>(__builtin_popcount(m & ((1 << i) - 1)) | INT32_MIN) : 0;
  }
};
const RankTable kRankTable;

// Eight values from v, never reading at or past end (how far the values may be read).
inline __m256 load8(const float* v, const float* end) {
  if (v + 8 <= end) return _mm256_loadu_ps(v);
  alignas(32) float tmp[8] = {0.f};
  for (int i = 0; v + i < end; ++i) tmp[i] = v[i];
  return _mm256_load_ps(tmp);
}
inline __m256 load8(const uint16_t* v, const uint16_t* end) {
  alignas(16) uint16_t tmp[8] = {0};
  const uint16_t* src = v;
  if (v + 8 > end) {
    for (int i = 0; v + i < end; ++i) tmp[i] = v[i];
    src = tmp;
  }
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

// Eight values from v where eight can be read (the caller checked).
inline __m256 load8_unchecked(const float* v) { return _mm256_loadu_ps(v); }
inline __m256 load8_unchecked(const uint16_t* v) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(v));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

inline float hsum(__m256 x) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  const __m128 d = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(d, _mm_shuffle_ps(d, d, 1)));
}

// One mask byte (atoms j .. j+7): adds its values times h into acc; returns the next value.
template <typename V, int NT>
inline const V* block8(unsigned m, int64_t j, int64_t atoms, const V* v, const V* end, const float* h,
                       int64_t hstride, __m256* acc) {
  if (!m) return v;
  const __m256 rank = _mm256_load_ps(reinterpret_cast<const float*>(kRankTable.rank[m]));
  const __m256 vals = _mm256_blendv_ps(_mm256_setzero_ps(),
                                       _mm256_permutevar8x32_ps(load8(v, end), _mm256_castps_si256(rank)), rank);
  if (j + 8 <= atoms) {
    for (int t = 0; t < NT; ++t) acc[t] = _mm256_fmadd_ps(vals, _mm256_loadu_ps(h + t * hstride + j), acc[t]);
  } else {  // the last byte of a row whose atoms are not a multiple of 8: load only the set lanes of h
    for (int t = 0; t < NT; ++t)
      acc[t] = _mm256_fmadd_ps(vals, _mm256_maskload_ps(h + t * hstride + j, _mm256_castps_si256(rank)), acc[t]);
  }
  return v + __builtin_popcount(m);
}

// The same for a whole mask byte (j + 8 <= atoms) whose eight values may be read without a check; a zero byte
// adds zeros (its table row has no sign bit set), cheaper than a branch.
template <typename V, int NT>
inline const V* block8_full(unsigned m, int64_t j, const V* v, const float* h, int64_t hstride, __m256* acc) {
  const __m256 rank = _mm256_load_ps(reinterpret_cast<const float*>(kRankTable.rank[m]));
  const __m256 vals = _mm256_blendv_ps(_mm256_setzero_ps(),
                                       _mm256_permutevar8x32_ps(load8_unchecked(v), _mm256_castps_si256(rank)), rank);
  for (int t = 0; t < NT; ++t) acc[t] = _mm256_fmadd_ps(vals, _mm256_loadu_ps(h + t * hstride + j), acc[t]);
  return v + __builtin_popcount(m);
}

// CH independent chains of multiply-adds per token (mask byte b goes to chain b % CH): one chain would wait out
// the FMA latency on every byte; with few tokens there are few other chains to overlap.
template <typename V, int NT>
void row_avx2(const uint8_t* mask, int64_t atoms, const V* v, const V* end, const float* h, int64_t hstride,
              float* out) {
  constexpr int CH = NT <= 2 ? 4 : 2;
  __m256 acc[CH][NT];
  for (int c = 0; c < CH; ++c)
    for (int t = 0; t < NT; ++t) acc[c][t] = _mm256_setzero_ps();
  const int64_t nbytes = (atoms + 7) / 8;
  int64_t b = 0;
  // CH whole bytes at a time while CH * 8 values can be read past v (end: how far the values may be read, past
  // the row's own where later rows or padding follow); then byte by byte with the checks
  for (; b + CH <= atoms / 8 && v + 8 * CH <= end; b += CH)
    for (int c = 0; c < CH; ++c) v = block8_full<V, NT>(mask[b + c], (b + c) * 8, v, h, hstride, acc[c]);
  for (; b < nbytes; ++b) v = block8<V, NT>(mask[b], b * 8, atoms, v, end, h, hstride, acc[0]);
  for (int t = 0; t < NT; ++t) {
    __m256 sum = acc[0][t];
    for (int c = 1; c < CH; ++c) sum = _mm256_add_ps(sum, acc[c][t]);
    out[t] = hsum(sum);
  }
}

template <typename V>
void row_tile(const uint8_t* mask, int64_t atoms, const V* v, const V* end, const float* h, int64_t hstride,
              int nt, float* out) {
  switch (nt) {
    case 1: return row_avx2<V, 1>(mask, atoms, v, end, h, hstride, out);
    case 2: return row_avx2<V, 2>(mask, atoms, v, end, h, hstride, out);
    case 3: return row_avx2<V, 3>(mask, atoms, v, end, h, hstride, out);
    case 4: return row_avx2<V, 4>(mask, atoms, v, end, h, hstride, out);
    default: return row_avx2<V, 4>(mask, atoms, v, end, h, hstride, out);  // the caller's tile is 4 here
  }
}
#else
template <typename V>
void row_tile(const uint8_t* mask, int64_t atoms, const V* v, const V* end, const float* h, int64_t hstride,
              int nt, float* out) {
  row_scalar(mask, (atoms + 7) / 8, v, h, hstride, nt, out);
}
#endif

// The values of a row as the row kernels read them. Stored as float32 or bfloat16: in place.
template <typename V>
struct StoredValues {
  const V* values;
  int64_t sparsity;
  int64_t out;
  const V* row(int64_t o, float* /*buf*/) const { return values + o * sparsity; }
  // how far a row kernel may read past the row's values: to the end of the matrix (the later rows' values)
  const V* readable_end(const V* /*row*/) const { return values + out * sparsity; }
};

// Stored as int8 numbers with float32 scales (what factorkit.quantize leaves: int8 with one scale per row,
// int4 kept one per byte with one scale per `group` values of a row, or grouped down the rows, block
// (group, 1)): the row's integers are widened and scaled into a float buffer of the thread (sparsity floats,
// in L1), read from there for every tile of tokens. Memory traffic is the integers and their scales.
struct Int8Values {
  const int8_t* q;
  const float* scale;
  int64_t sparsity, group;
  bool by_columns;
  const float* row(int64_t o, float* buf) const {
    const int8_t* qr = q + o * sparsity;
    if (by_columns) {
      const float* s = scale + (o / group) * sparsity;
      for (int64_t i = 0; i < sparsity; ++i) buf[i] = static_cast<float>(qr[i]) * s[i];
    } else {
      const float* s = scale + o * (sparsity / group);
      for (int64_t g0 = 0; g0 < sparsity; g0 += group) {
        const float sg = s[g0 / group];
        for (int64_t i = g0; i < g0 + group; ++i) buf[i] = static_cast<float>(qr[i]) * sg;
      }
    }
    return buf;
  }
  static constexpr int64_t kPad = 64;  // the buffer's zeros past the row's values: whole-byte reads need no check
  const float* readable_end(const float* row) const { return row + sparsity + kPad; }
};

template <typename P>
void run(const float* h, const uint8_t* mask, const P& values, float* y, int64_t tokens, int64_t out,
         int64_t atoms, int64_t sparsity, int64_t blocks) {
  const int64_t nbytes = (atoms + 7) / 8, hstride = blocks * atoms, rows_per_block = out / blocks;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, sparsity));
  at::parallel_for(0, out, grain, [&](int64_t begin, int64_t end) {
    float acc[kTile];
    std::vector<float> buf(std::is_same<P, Int8Values>::value ? sparsity + Int8Values::kPad : 0);
    for (int64_t o = begin; o < end; ++o) {
      const uint8_t* row_mask = mask + o * nbytes;
      const auto* row_values = values.row(o, buf.data());
      const float* row_h = h + (o / rows_per_block) * atoms;
      for (int64_t t0 = 0; t0 < tokens; t0 += kTile) {
        const int nt = static_cast<int>(std::min<int64_t>(kTile, tokens - t0));
        row_tile(row_mask, atoms, row_values, values.readable_end(row_values), row_h + t0 * hstride, hstride, nt,
                 acc);
        for (int t = 0; t < nt; ++t) y[(t0 + t) * out + o] = acc[t];
      }
    }
  });
}

#if defined(FK_AVX512) || defined(FK_AVX2)
// Tokens in the lanes (for more tokens than the row kernels above take): hT is h transposed and zero-padded,
// (blocks*atoms) x tokensL floats with tokensL a multiple of kLanes (16 with AVX-512, 8 with AVX2), and every
// stored value multiplies NT vectors of kLanes tokens, one fused multiply-add per value and vector instead of
// one per vector of atoms (half of them zero at rho = 2) and token. The set bits are walked 64 at a time.
#ifdef FK_AVX512
constexpr int kLanes = 16;
using Vec = __m512;
inline Vec vzero() { return _mm512_setzero_ps(); }
inline Vec vset1(float x) { return _mm512_set1_ps(x); }
inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline void vstore(float* p, Vec x) { _mm512_storeu_ps(p, x); }
constexpr int kLanesTile = 4;  // 64 tokens a pass: 4 accumulators
#else
constexpr int kLanes = 8;
using Vec = __m256;
inline Vec vzero() { return _mm256_setzero_ps(); }
inline Vec vset1(float x) { return _mm256_set1_ps(x); }
inline Vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline void vstore(float* p, Vec x) { _mm256_storeu_ps(p, x); }
constexpr int kLanesTile = 8;  // 64 tokens a pass: 8 of the 16 ymm registers accumulate
#endif

template <typename V, int NT>
inline void lanes_bits(uint64_t m, int64_t base, const V* v, int64_t& i, const float* hT, int64_t hstride,
                       Vec* acc) {
  while (m) {
    const int64_t j = base + __builtin_ctzll(m);
    const Vec value = vset1(load_value(v, i++));
    const float* row = hT + j * hstride;
    for (int t = 0; t < NT; ++t) acc[t] = vfma(value, vload(row + kLanes * t), acc[t]);
    m &= m - 1;
  }
}

template <typename V, int NT>
void row_lanes(const uint8_t* mask, int64_t nbytes, const V* v, const float* hT, int64_t hstride, float* out) {
  Vec acc[NT];
  for (int t = 0; t < NT; ++t) acc[t] = vzero();
  int64_t i = 0, b = 0;
  for (; b + 8 <= nbytes; b += 8) {
    uint64_t m;
    std::memcpy(&m, mask + b, 8);
    lanes_bits<V, NT>(m, b * 8, v, i, hT, hstride, acc);
  }
  for (; b < nbytes; ++b) lanes_bits<V, NT>(mask[b], b * 8, v, i, hT, hstride, acc);
  for (int t = 0; t < NT; ++t) vstore(out + kLanes * t, acc[t]);
}

template <typename V, int NT = kLanesTile>
void row_lanes_tile(int nt, const uint8_t* mask, int64_t nbytes, const V* v, const float* hT, int64_t hstride,
                    float* out) {
  if constexpr (NT > 1) {
    if (nt < NT) return row_lanes_tile<V, NT - 1>(nt, mask, nbytes, v, hT, hstride, out);
  }
  row_lanes<V, NT>(mask, nbytes, v, hT, hstride, out);
}

// yT: (out x tokensL) float; hT: (blocks*atoms x tokensL).
template <typename V>
void run_lanes(const float* hT, const uint8_t* mask, const V* values, float* yT, int64_t tokensL, int64_t out,
               int64_t atoms, int64_t sparsity, int64_t blocks) {
  const int64_t nbytes = (atoms + 7) / 8, rows_per_block = out / blocks, pass = kLanes * kLanesTile;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, sparsity));
  at::parallel_for(0, out, grain, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      const uint8_t* row_mask = mask + o * nbytes;
      const V* row_values = values + o * sparsity;
      const float* row_h = hT + (o / rows_per_block) * atoms * tokensL;
      for (int64_t t0 = 0; t0 < tokensL; t0 += pass) {
        const int nt = static_cast<int>(std::min<int64_t>(kLanesTile, (tokensL - t0) / kLanes));
        row_lanes_tile<V>(nt, row_mask, nbytes, row_values, row_h + t0, tokensL, yT + o * tokensL + t0);
      }
    }
  });
}
#else
constexpr int kLanes = 0;  // no vector path: no lanes kernel
#endif

// The checks every entry point makes on the codes of an (out x blocks*atoms) matrix.
void check_support(const torch::Tensor& support, const torch::Tensor& values, int64_t atoms, int64_t blocks) {
  TORCH_CHECK(support.dim() == 2 && support.scalar_type() == torch::kUInt8 && support.is_contiguous(),
              "support must be a contiguous uint8 bit mask");
  TORCH_CHECK(values.dim() == 2 && values.is_contiguous(), "values must be a contiguous matrix");
  TORCH_CHECK(blocks >= 1 && values.size(0) % blocks == 0, "blocks must divide the output rows");
  TORCH_CHECK(support.size(0) == values.size(0) && support.size(1) == (atoms + 7) / 8,
              "support must be out x ceil(atoms/8)");
}

void check_codes(const torch::Tensor& support, const torch::Tensor& values, int64_t atoms, int64_t blocks) {
  check_support(support, values, atoms, blocks);
  TORCH_CHECK(values.scalar_type() == torch::kFloat32 || values.scalar_type() == torch::kBFloat16,
              "values must be a float32 or bfloat16 matrix");
}

void check_h(const torch::Tensor& h, int64_t atoms, int64_t blocks) {
  TORCH_CHECK(h.dim() == 2 && h.scalar_type() == torch::kFloat32 && h.is_contiguous(),
              "h must be a contiguous (tokens x atoms) float32 matrix");
  TORCH_CHECK(h.size(1) == blocks * atoms, "h must have blocks*atoms columns");
}

// f(pointer to the values): float for float32, the raw 16 bits for bfloat16.
template <typename F>
void with_values(const torch::Tensor& values, F&& f) {
  if (values.scalar_type() == torch::kFloat32) {
    f(values.data_ptr<float>());
  } else {
    f(reinterpret_cast<const uint16_t*>(values.data_ptr()));
  }
}

}  // namespace

// hT: (blocks*atoms, tokensL) float32 with tokensL a multiple of lane_width() (h transposed, zero-padded);
// support and values as for mask_codes. Returns yT: (out, tokensL) float32. AVX-512 and AVX2 builds.
torch::Tensor mask_codes_lanes(torch::Tensor hT, torch::Tensor support, torch::Tensor values, int64_t atoms,
                               int64_t blocks) {
#if defined(FK_AVX512) || defined(FK_AVX2)
  check_codes(support, values, atoms, blocks);
  TORCH_CHECK(hT.dim() == 2 && hT.scalar_type() == torch::kFloat32 && hT.is_contiguous() &&
                  hT.size(1) % kLanes == 0,
              "hT must be a contiguous (atoms x tokens) float32 matrix, tokens a multiple of lane_width()");
  const int64_t out = values.size(0), sparsity = values.size(1), tokensL = hT.size(1);
  TORCH_CHECK(hT.size(0) == blocks * atoms, "hT must have blocks*atoms rows");
  auto yT = torch::empty({out, tokensL}, hT.options());
  with_values(values, [&](auto* v) {
    run_lanes(hT.data_ptr<float>(), support.data_ptr<uint8_t>(), v, yT.data_ptr<float>(), tokensL, out, atoms,
              sparsity, blocks);
  });
  return yT;
#else
  TORCH_CHECK(false, "mask_codes_lanes needs the AVX-512 or AVX2 build");
#endif
}

// The tokens one vector of the lanes kernel holds: 16 (AVX-512), 8 (AVX2), 0 (scalar build: no lanes kernel).
int64_t lane_width() { return kLanes; }

// h: (tokens, blocks*atoms) float32; support: (out, ceil(atoms/8)) uint8; values: (out, s) float32 or
// bfloat16. Returns y: (tokens, out) float32.
torch::Tensor mask_codes(torch::Tensor h, torch::Tensor support, torch::Tensor values, int64_t atoms,
                         int64_t blocks) {
  check_codes(support, values, atoms, blocks);
  check_h(h, atoms, blocks);
  const int64_t out = values.size(0), sparsity = values.size(1), tokens = h.size(0);
  auto y = torch::empty({tokens, out}, h.options());
  with_values(values, [&](auto* v) {
    using V = std::remove_const_t<std::remove_pointer_t<decltype(v)>>;
    run(h.data_ptr<float>(), support.data_ptr<uint8_t>(), StoredValues<V>{v, sparsity, out}, y.data_ptr<float>(),
        tokens, out, atoms, sparsity, blocks);
  });
  return y;
}

// The same with the values stored as int8 numbers q (out, s) and float32 scales: scale (out, s / group)
// with a scale per `group` values of a row (group = s: one per row), or with by_columns (out / group, s),
// a scale per `group` rows of a column. What factorkit.quantize leaves in DictionaryLinear.values.
torch::Tensor mask_codes_int8(torch::Tensor h, torch::Tensor support, torch::Tensor q, torch::Tensor scale,
                              int64_t group, bool by_columns, int64_t atoms, int64_t blocks) {
  check_support(support, q, atoms, blocks);
  check_h(h, atoms, blocks);
  TORCH_CHECK(q.scalar_type() == torch::kInt8, "q must be an int8 matrix");
  const int64_t out = q.size(0), sparsity = q.size(1), tokens = h.size(0);
  TORCH_CHECK(group >= 1 && (by_columns ? out : sparsity) % group == 0, "group must divide the grouped dimension");
  TORCH_CHECK(scale.scalar_type() == torch::kFloat32 && scale.is_contiguous() &&
                  scale.numel() == (by_columns ? out / group * sparsity : out * (sparsity / group)),
              "scale must be a contiguous float32 tensor with one scale per group");
  auto y = torch::empty({tokens, out}, h.options());
  run(h.data_ptr<float>(), support.data_ptr<uint8_t>(),
      Int8Values{q.data_ptr<int8_t>(), scale.data_ptr<float>(), sparsity, group, by_columns}, y.data_ptr<float>(),
      tokens, out, atoms, sparsity, blocks);
  return y;
}

// The dense code matrix C (out x blocks*atoms, the values' dtype) written straight from the mask: what the
// code-GEMM kernel multiplies by, without an index tensor or a bool copy of the mask.
torch::Tensor codes_dense(torch::Tensor support, torch::Tensor values, int64_t atoms, int64_t blocks) {
  check_codes(support, values, atoms, blocks);
  const int64_t out = values.size(0), sparsity = values.size(1), nbytes = (atoms + 7) / 8;
  auto C = torch::zeros({out, blocks * atoms}, values.options());
  const int64_t width = blocks * atoms, rows_per_block = out / blocks;
  const uint8_t* mask = support.data_ptr<uint8_t>();
  const size_t elem = values.element_size();
  const char* src = static_cast<const char*>(values.data_ptr());
  char* dst = static_cast<char*>(C.data_ptr());
  at::parallel_for(0, out, 64, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      const char* v = src + o * sparsity * elem;
      char* row = dst + (o * width + (o / rows_per_block) * atoms) * elem;
      for (int64_t b = 0; b < nbytes; ++b) {
        unsigned m = mask[o * nbytes + b];
        while (m) {
          std::memcpy(row + (b * 8 + __builtin_ctz(m)) * elem, v, elem);
          v += elem;
          m &= m - 1;
        }
      }
    }
  });
  return C;
}

// The instruction set the code product was compiled for: "avx512", "avx2" or "scalar".
std::string isa() {
#if defined(FK_AVX512)
  return "avx512";
#elif defined(FK_AVX2)
  return "avx2";
#else
  return "scalar";
#endif
}

// How many of torch's threads an at::parallel_for over `n` items runs on here (1 when the extension was built
// without OpenMP: then every kernel above runs on one thread, whatever torch.set_num_threads says).
int64_t parallel_threads(int64_t n) {
  std::vector<uint8_t> seen(std::max<int64_t>(at::get_num_threads(), 1) + 64, 0);
  at::parallel_for(0, n, 1, [&](int64_t, int64_t) {
    const int64_t id = at::get_thread_num();
    if (id >= 0 && id < static_cast<int64_t>(seen.size())) seen[id] = 1;
  });
  int64_t count = 0;
  for (uint8_t v : seen) count += v;
  return count;
}

// quant.cpp
torch::Tensor int8_rows(torch::Tensor x, torch::Tensor q, torch::Tensor scale, int64_t group);
torch::Tensor int8_colgroups(torch::Tensor x, torch::Tensor q, torch::Tensor scale, int64_t group);
// solver.cpp
std::vector<torch::Tensor> batch_omp(torch::Tensor gram, torch::Tensor correlations, int64_t sparsity, double tiny);
void ksvd_sweep(torch::Tensor residual, torch::Tensor atoms, torch::Tensor indices, torch::Tensor values,
                int64_t power);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("mask_codes", &mask_codes, "DictionaryLinear's code product from the packed support mask");
  m.def("mask_codes_lanes", &mask_codes_lanes, "the same with the tokens in the vector lanes (more tokens)");
  m.def("lane_width", &lane_width, "tokens per vector of mask_codes_lanes: 16, 8, or 0 where it is not built");
  m.def("mask_codes_int8", &mask_codes_int8, "the same with int8 values and float scales (factorkit.quantize)");
  m.def("codes_dense", &codes_dense, "the dense code matrix written from the support mask");
  m.def("int8_rows", &int8_rows, "a few tokens times int8 weights with a scale per row or per group of a row");
  m.def("int8_colgroups", &int8_colgroups, "the same with the scales grouped down the columns (block (g, 1))");
  m.def("batch_omp", &batch_omp, "Batch-OMP codes of many signals from the dictionary's Gram (CoSpaDi's solver)");
  m.def("ksvd_sweep", &ksvd_sweep, "one K-SVD pass over all atoms, in place (CoSpaDi's solver)");
  m.def("parallel_threads", &parallel_threads, "threads an at::parallel_for over n items runs on (1 without OpenMP)");
  m.def("isa", &isa, "the instruction set of the code product: avx512, avx2 or scalar");
}
