// Quantized-block weights × activations: ggml's Q4_1 and Q8_0 blocks of 32, the blocks'
// fp16 scales gathered at the front of each row.
//
// A weight [N, K] (G = K / 32 blocks a row) is a uint8 tensor [N, G·B], each row
//   Q4_1 (B = 20): G × fp16 d, G × fp16 m, then G × 16 bytes: byte j of a block holds q[j]
//                  (low nibble) and q[j + 16] (high); w = q·d + m, q in 0..15;
//   Q8_0 (B = 34): G × fp16 d, then G × 32 int8 q; w = q·d.
//
//   slotmesh_native::block_gemm(Tensor x [M, K] float, Tensor blocks, int n, int kind,
//                               Tensor? bias) -> Tensor [M, N] float      (kind 0 Q4_1, 1 Q8_0)
//
// Decode-sized M (≤ kDirectRows): each row of x is quantized to int16 in blocks of 32
// (scale max|x| / 32767, so an activation is off by at most 1/65534 of its block's largest),
// and a weight block meets it as integers: madd of the block's 16-bit values with x's gives
// exact int32 sums, scaled once a block by d·dx (Q4_1's m term uses x's fp32 block sums).
// That is ~13 vector instructions a block instead of ~22 to widen 32 weights to fp32, and
// the weights stream at 5 / 8.5 bits. Up to 4 rows of x (8 with VNNI) share each decoded
// weight block.
// Larger M (prefill): rows of W are widened to fp32 into a panel and multiplied with
// at::mm (the BLAS GEMM, fp32 activations), a panel at a time.
// With AVX-512 VNNI two blocks share a 512-bit vector (x's int16 rows laid out to match,
// see xq_index) and up to 8 rows of x a decoded pair; else AVX2 + FMA + F16C; the same
// integer maths in plain loops otherwise.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define SLOTMESH_BLOCK_AVX2 1
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define SLOTMESH_BLOCK_VNNI 1  // AVX-512 with VNNI: two blocks a 512-bit vector
#endif
#endif

namespace {

constexpr int64_t kBlock = 32;             // weights per block
constexpr int64_t kDirectRows = 32;        // M above this: widened panel + at::mm
constexpr int64_t kPanelFloats = 1 << 20;  // fp32 panel size (4 MiB) for the at::mm path
constexpr float kInt16Max = 32767.f;
constexpr int kVnniRows = 8;               // rows of x that share a decoded weight pair (VNNI)
enum Kind : int64_t { kQ4_1 = 0, kQ8_0 = 1 };

constexpr int64_t block_bytes(int64_t kind) { return kind == kQ4_1 ? 20 : 34; }
constexpr int64_t scale_bytes(int64_t kind) { return kind == kQ4_1 ? 4 : 2; }

inline float half_at(const uint8_t* p) {  // no alignment assumed
  uint16_t h;
  std::memcpy(&h, p, 2);
  return c10::detail::fp16_ieee_to_fp32_value(h);
}

// The fp16 scales of a row → floats: out[g] = d of block g, and for Q4_1 out[G + g] = m.
template <int64_t KIND>
void row_scales(const uint8_t* row, int64_t nblocks, float* out) {
  const int64_t count = nblocks * scale_bytes(KIND) / 2;
  int64_t i = 0;
#ifdef SLOTMESH_BLOCK_AVX2
  for (; i + 8 <= count; i += 8)
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 2 * i))));
#endif
  for (; i < count; ++i) out[i] = half_at(row + 2 * i);
}

// Block g of a row → 32 floats (the panel path).
template <int64_t KIND>
inline void widen_block(const float* scales, int64_t nb, const uint8_t* qs, int64_t g,
                        float* w) {
  const float d = scales[g];
#ifdef SLOTMESH_BLOCK_AVX2
  const __m256 vd = _mm256_set1_ps(d);
  __m128i parts[4];  // the bytes of values 0-7, 8-15, 16-23, 24-31 in their low 8 bytes
  if constexpr (KIND == kQ4_1) {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + 16 * g));
    const __m128i nib = _mm_set1_epi8(0x0F);
    parts[0] = _mm_and_si128(raw, nib);
    parts[2] = _mm_and_si128(_mm_srli_epi16(raw, 4), nib);
  } else {
    parts[0] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + 32 * g));
    parts[2] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + 32 * g + 16));
  }
  parts[1] = _mm_srli_si128(parts[0], 8);
  parts[3] = _mm_srli_si128(parts[2], 8);
  for (int i = 0; i < 4; ++i) {
    __m256 v;
    if constexpr (KIND == kQ4_1)
      v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[i])), vd,
                          _mm256_set1_ps(scales[nb + g]));
    else
      v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(parts[i])), vd);
    _mm256_storeu_ps(w + 8 * i, v);
  }
#else
  if constexpr (KIND == kQ4_1) {
    const float m = scales[nb + g];
    const uint8_t* q = qs + 16 * g;
    for (int j = 0; j < 16; ++j) {
      w[j] = static_cast<float>(q[j] & 0x0F) * d + m;
      w[j + 16] = static_cast<float>(q[j] >> 4) * d + m;
    }
  } else {
    const int8_t* q = reinterpret_cast<const int8_t*>(qs) + 32 * g;
    for (int j = 0; j < 32; ++j) w[j] = static_cast<float>(q[j]) * d;
  }
#endif
}

// Where value j of block g of a row of x goes in the int16 row. With VNNI, blocks pair up
// (g = 2p, 2p + 1) so that one 512-bit vector holds half of each, the halves a weight
// pair unpacks to (pair_int16): [x_2p[0..15], x_2p+1[0..15], x_2p[16..31], x_2p+1[16..31]];
// an odd last block stays in order. Plain order otherwise.
inline int64_t xq_index(int64_t g, int64_t j, int64_t nblocks) {
#ifdef SLOTMESH_BLOCK_VNNI
  if (g < nblocks - (nblocks & 1))
    return (g & ~int64_t{1}) * kBlock + (j >= 16 ? 32 : 0) + (g & 1) * 16 + (j & 15);
#endif
  (void)nblocks;
  return g * kBlock + j;
}

// x [M, K] float → int16 [M, K] (in xq_index's order), per block of 32: scale
// dx = max|x| / 32767 and the fp32 sum of the block (Q4_1's m·Σx term).
void quantize_rows(const float* x, int64_t m, int64_t k, int16_t* xq, float* dx, float* sx) {
  const int64_t nblocks = k / kBlock;
  for (int64_t i = 0; i < m * nblocks; ++i) {
    const float* v = x + i * kBlock;
    float amax = 0.f, sum = 0.f;
    for (int j = 0; j < kBlock; ++j) {
      amax = std::max(amax, std::fabs(v[j]));
      sum += v[j];
    }
    const float d = amax / kInt16Max, inv = amax > 0.f ? kInt16Max / amax : 0.f;
    int16_t* row = xq + (i / nblocks) * k;
    const int64_t g = i % nblocks;
    for (int j = 0; j < kBlock; ++j)
      row[xq_index(g, j, nblocks)] = static_cast<int16_t>(std::nearbyint(v[j] * inv));
    dx[i] = d;
    sx[i] = sum;
  }
}

struct Activations {
  const int16_t* xq;  // [M, K]
  const float* dx;    // [M, K/32]
  const float* sx;    // [M, K/32]
  int64_t k, nblocks;
  const float* dxv;   // VNNI: [M, K/64, 16], pair p's [dx_2p ×8, dx_2p+1 ×8]
};

#ifdef SLOTMESH_BLOCK_AVX2
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// A block's 32 quantized weights as two vectors of 16 int16 (values 0-15, 16-31).
template <int64_t KIND>
inline void block_int16(const uint8_t* qs, int64_t g, __m256i& lo, __m256i& hi) {
  if constexpr (KIND == kQ4_1) {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + 16 * g));
    const __m128i nib = _mm_set1_epi8(0x0F);
    lo = _mm256_cvtepu8_epi16(_mm_and_si128(raw, nib));
    hi = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(raw, 4), nib));
  } else {
    const __m128i* q = reinterpret_cast<const __m128i*>(qs + 32 * g);
    lo = _mm256_cvtepi8_epi16(_mm_loadu_si128(q));
    hi = _mm256_cvtepi8_epi16(_mm_loadu_si128(q + 1));
  }
}

// Q4_1's Σ_g m_g · Σx_g over a row's blocks, 8 blocks a vector.
inline float m_term(const float* m, const float* sx, int64_t nb) {
  __m256 v = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= nb; i += 8) v = _mm256_fmadd_ps(_mm256_loadu_ps(m + i), _mm256_loadu_ps(sx + i), v);
  float sum = hsum(v);
  for (; i < nb; ++i) sum += m[i] * sx[i];
  return sum;
}

// 8 int32 partial sums of <weight block, x block> (exact: |q·x| < 2^20, 32 terms).
inline __m256i block_dot(__m256i lo, __m256i hi, const int16_t* x) {
  const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 16));
  return _mm256_add_epi32(_mm256_madd_epi16(lo, x0), _mm256_madd_epi16(hi, x1));
}
#endif

#ifdef SLOTMESH_BLOCK_VNNI
// Blocks g and g + 1 of a row as two vectors of 32 int16: lo = values 0-15 of each,
// hi = values 16-31 of each (xq_index's order).
template <int64_t KIND>
inline void pair_int16(const uint8_t* qs, int64_t g, __m512i& lo, __m512i& hi) {
  if constexpr (KIND == kQ4_1) {  // the two blocks' 32 bytes: low nibbles 0-15, high 16-31
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 16 * g));
    const __m256i nib = _mm256_set1_epi8(0x0F);
    lo = _mm512_cvtepu8_epi16(_mm256_and_si256(raw, nib));
    hi = _mm512_cvtepu8_epi16(_mm256_and_si256(_mm256_srli_epi16(raw, 4), nib));
  } else {
    const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 32 * g));
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 32 * g + 32));
    lo = _mm512_cvtepi8_epi16(_mm256_permute2x128_si256(a, b, 0x20));
    hi = _mm512_cvtepi8_epi16(_mm256_permute2x128_si256(a, b, 0x31));
  }
}

// row_dot's VNNI form, R ≤ kVnniRows rows: a pair of blocks is two vpdpwssd a row (int32
// lanes 0-7 the first block's sums, 8-15 the second's, exact), one convert and one FMA by
// [d·dx of the first ×8, of the second ×8]. Even and odd pairs in two accumulators, an odd
// last block through the AVX2 form, then Q4_1's m term: a fixed order for every R.
template <int64_t KIND, int R>
void row_dot_vnni(const float* scales, const uint8_t* qs, const Activations& a, int64_t r0,
                  float* out) {
  const int64_t nb = a.nblocks, pairs = nb / 2;
  __m512 acc[2][R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) acc[0][r] = acc[1][r] = _mm512_setzero_ps();
  const int16_t* x = a.xq + r0 * a.k;
  const float* dx = a.dx + r0 * nb;
  const float* dxv = a.dxv + r0 * pairs * 16;
  for (int64_t p = 0; p < pairs; ++p) {
    const int64_t g = 2 * p;
    __m512i lo, hi;
    pair_int16<KIND>(qs, g, lo, hi);
    const __m512 d = _mm512_insertf32x8(_mm512_set1_ps(scales[g]), _mm256_set1_ps(scales[g + 1]),
                                        1);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const int16_t* xr = x + r * a.k + g * kBlock;
      __m512i s = _mm512_dpwssd_epi32(_mm512_setzero_si512(), lo,
                                      _mm512_loadu_si512(reinterpret_cast<const void*>(xr)));
      s = _mm512_dpwssd_epi32(s, hi, _mm512_loadu_si512(reinterpret_cast<const void*>(xr + 32)));
      const __m512 ddx = _mm512_mul_ps(d, _mm512_loadu_ps(dxv + (r * pairs + p) * 16));
      acc[p & 1][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), ddx, acc[p & 1][r]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[0][r], acc[1][r]));
  if (nb & 1) {  // the last block, in plain order
    const int64_t g = nb - 1;
    __m256i lo, hi;
    block_int16<KIND>(qs, g, lo, hi);
    for (int r = 0; r < R; ++r)
      out[r] += hsum(_mm256_mul_ps(_mm256_cvtepi32_ps(block_dot(lo, hi, x + r * a.k + g * kBlock)),
                                   _mm256_set1_ps(scales[g] * dx[r * nb + g])));
  }
  if constexpr (KIND == kQ4_1)
    for (int r = 0; r < R; ++r) out[r] += m_term(scales + nb, a.sx + (r0 + r) * nb, nb);
}
#endif

// out[r] = <row of W, row r of x> for R ≤ 4 rows of x. Every R adds a row's blocks in
// the same order (two accumulators, even and odd blocks), so a row's result does not
// depend on how many rows share the call.
template <int64_t KIND, int R>
void row_dot(const float* scales, const uint8_t* qs, const Activations& a, int64_t r0,
             float* ddx, float* out) {
  const int64_t nb = a.nblocks;
  // d·dx of every block and row, ahead (a vectorised loop; the block loop then loads them)
  for (int r = 0; r < R; ++r)
    for (int64_t g = 0; g < nb; ++g) ddx[r * nb + g] = scales[g] * a.dx[(r0 + r) * nb + g];
#ifdef SLOTMESH_BLOCK_AVX2
  // even and odd blocks into two accumulators a row; written out (no helper taking their
  // address), so that they stay in registers: spilled, every FMA waited on a store
  __m256 even[R], odd[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) even[r] = odd[r] = _mm256_setzero_ps();
  const int16_t* x = a.xq + r0 * a.k;
  int64_t g = 0;
  __m256i lo, hi;
  for (; g + 2 <= nb; g += 2) {
    block_int16<KIND>(qs, g, lo, hi);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r)
      even[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_dot(lo, hi, x + r * a.k + g * kBlock)),
                                _mm256_broadcast_ss(ddx + r * nb + g), even[r]);
    block_int16<KIND>(qs, g + 1, lo, hi);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r)
      odd[r] = _mm256_fmadd_ps(
          _mm256_cvtepi32_ps(block_dot(lo, hi, x + r * a.k + (g + 1) * kBlock)),
          _mm256_broadcast_ss(ddx + r * nb + g + 1), odd[r]);
  }
  if (g < nb) {
    block_int16<KIND>(qs, g, lo, hi);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r)
      even[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_dot(lo, hi, x + r * a.k + g * kBlock)),
                                _mm256_broadcast_ss(ddx + r * nb + g), even[r]);
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) out[r] = hsum(_mm256_add_ps(even[r], odd[r]));
  if constexpr (KIND == kQ4_1)
    for (int r = 0; r < R; ++r) out[r] += m_term(scales + nb, a.sx + (r0 + r) * nb, nb);
#else
  float acc[R][2] = {};
  for (int64_t g = 0; g < nb; ++g) {
    int16_t q[kBlock];
    if constexpr (KIND == kQ4_1) {
      for (int j = 0; j < 16; ++j) {
        q[j] = qs[16 * g + j] & 0x0F;
        q[j + 16] = qs[16 * g + j] >> 4;
      }
    } else {
      for (int j = 0; j < 32; ++j) q[j] = reinterpret_cast<const int8_t*>(qs)[32 * g + j];
    }
    for (int r = 0; r < R; ++r) {
      const int64_t row = r0 + r;
      const int16_t* x = a.xq + row * a.k + g * kBlock;
      int32_t s = 0;
      for (int j = 0; j < kBlock; ++j) s += static_cast<int32_t>(q[j]) * x[j];
      acc[r][g & 1] += static_cast<float>(s) * ddx[r * nb + g];
    }
  }
  for (int r = 0; r < R; ++r) {
    float mterm = 0.f;
    if constexpr (KIND == kQ4_1)
      for (int64_t g = 0; g < nb; ++g) mterm += scales[nb + g] * a.sx[(r0 + r) * nb + g];
    out[r] = acc[r][0] + acc[r][1] + mterm;
  }
#endif
}

// Rows [n0, n1) of W against every row of x.
template <int64_t KIND>
void direct_rows(const Activations& a, int64_t m, const uint8_t* w, int64_t n0, int64_t n1,
                 float* out, int64_t n) {
  const int64_t nb = a.nblocks, row_bytes = nb * block_bytes(KIND);
  std::vector<float> scales(2 * nb), ddx(4 * nb);
  float tmp[kVnniRows];
  for (int64_t j = n0; j < n1; ++j) {
    const uint8_t* row = w + j * row_bytes;
    row_scales<KIND>(row, nb, scales.data());
    const uint8_t* qs = row + nb * scale_bytes(KIND);
#ifdef SLOTMESH_BLOCK_VNNI
    for (int64_t r = 0; r < m; r += kVnniRows) {
      const int64_t rows = std::min<int64_t>(kVnniRows, m - r);
      switch (rows) {
        case 1: row_dot_vnni<KIND, 1>(scales.data(), qs, a, r, tmp); break;
        case 2: row_dot_vnni<KIND, 2>(scales.data(), qs, a, r, tmp); break;
        case 3: row_dot_vnni<KIND, 3>(scales.data(), qs, a, r, tmp); break;
        case 4: row_dot_vnni<KIND, 4>(scales.data(), qs, a, r, tmp); break;
        case 5: row_dot_vnni<KIND, 5>(scales.data(), qs, a, r, tmp); break;
        case 6: row_dot_vnni<KIND, 6>(scales.data(), qs, a, r, tmp); break;
        case 7: row_dot_vnni<KIND, 7>(scales.data(), qs, a, r, tmp); break;
        default: row_dot_vnni<KIND, 8>(scales.data(), qs, a, r, tmp); break;
      }
      for (int64_t i = 0; i < rows; ++i) out[(r + i) * n + j] = tmp[i];
    }
    continue;
#endif
    for (int64_t r = 0; r < m; r += 4) {
      const int64_t rows = std::min<int64_t>(4, m - r);
      if (rows == 4) row_dot<KIND, 4>(scales.data(), qs, a, r, ddx.data(), tmp);
      if (rows == 3) row_dot<KIND, 3>(scales.data(), qs, a, r, ddx.data(), tmp);
      if (rows == 2) row_dot<KIND, 2>(scales.data(), qs, a, r, ddx.data(), tmp);
      if (rows == 1) row_dot<KIND, 1>(scales.data(), qs, a, r, ddx.data(), tmp);
      for (int64_t i = 0; i < rows; ++i) out[(r + i) * n + j] = tmp[i];
    }
  }
}

template <int64_t KIND>
void widen_rows(const uint8_t* w, int64_t k, int64_t n0, int64_t n1, float* panel) {
  const int64_t nb = k / kBlock, row_bytes = nb * block_bytes(KIND);
  std::vector<float> scales(2 * nb);
  for (int64_t j = n0; j < n1; ++j) {
    const uint8_t* row = w + j * row_bytes;
    row_scales<KIND>(row, nb, scales.data());
    for (int64_t g = 0; g < nb; ++g)
      widen_block<KIND>(scales.data(), nb, row + nb * scale_bytes(KIND), g,
                        panel + (j - n0) * k + g * kBlock);
  }
}

template <int64_t KIND>
void gemm(const at::Tensor& x, const at::Tensor& blocks, at::Tensor& out) {
  const int64_t m = x.size(0), k = x.size(1), n = out.size(1), nb = k / kBlock;
  const uint8_t* wp = blocks.data_ptr<uint8_t>();
  if (m <= kDirectRows) {
    at::Tensor xq = at::empty({m, k}, x.options().dtype(at::kShort));
    at::Tensor stats = at::empty({2, m, nb}, x.options());
    quantize_rows(x.data_ptr<float>(), m, k, xq.data_ptr<int16_t>(), stats[0].data_ptr<float>(),
                  stats[1].data_ptr<float>());
    Activations a{xq.data_ptr<int16_t>(), stats[0].data_ptr<float>(),
                  stats[1].data_ptr<float>(), k, nb, nullptr};
#ifdef SLOTMESH_BLOCK_VNNI
    at::Tensor dxv = at::empty({m, nb / 2, 16}, x.options());
    float* dv = dxv.data_ptr<float>();
    for (int64_t r = 0; r < m; ++r)
      for (int64_t p = 0; p < nb / 2; ++p)
        for (int i = 0; i < 16; ++i) dv[(r * (nb / 2) + p) * 16 + i] = a.dx[r * nb + 2 * p + i / 8];
    a.dxv = dv;
#endif
    float* op = out.data_ptr<float>();
    // a work item is a few rows of W: each thread streams its own share of the weights
    at::parallel_for(0, n, 16, [&](int64_t n0, int64_t n1) {
      direct_rows<KIND>(a, m, wp, n0, n1, op, n);
    });
    return;
  }
  const int64_t panel_rows = std::max<int64_t>(64, kPanelFloats / k);
  at::Tensor panel = at::empty({std::min(panel_rows, n), k}, x.options());
  for (int64_t p0 = 0; p0 < n; p0 += panel_rows) {
    const int64_t p1 = std::min(n, p0 + panel_rows);
    float* pp = panel.data_ptr<float>();
    at::parallel_for(p0, p1, 16, [&](int64_t n0, int64_t n1) {
      widen_rows<KIND>(wp, k, n0, n1, pp + (n0 - p0) * k);
    });
    at::Tensor slice = out.narrow(1, p0, p1 - p0);
    at::mm_out(slice, x, panel.narrow(0, 0, p1 - p0).t());
  }
}

at::Tensor block_gemm(const at::Tensor& x, const at::Tensor& blocks, int64_t n, int64_t kind,
                      const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(kind == kQ4_1 || kind == kQ8_0, "block_gemm: kind ", kind,
              " is neither 0 (Q4_1) nor 1 (Q8_0)");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "block_gemm: x must be a 2-D float32 CPU tensor, got ", x.sizes(), " ",
              x.scalar_type());
  TORCH_CHECK(blocks.dim() == 2 && blocks.scalar_type() == at::kByte && blocks.is_contiguous(),
              "block_gemm: blocks must be a contiguous uint8 [N, K/32 * B] tensor");
  const int64_t k = x.size(1);
  TORCH_CHECK(k % kBlock == 0, "block_gemm: K=", k, " is not a multiple of 32");
  TORCH_CHECK(blocks.size(0) == n && blocks.size(1) == k / kBlock * block_bytes(kind),
              "block_gemm: blocks ", blocks.sizes(), " do not hold a [", n, ", ", k,
              "] weight of kind ", kind);
  if (bias.has_value())
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n && bias->scalar_type() == at::kFloat,
                "block_gemm: bias must be float32 [", n, "]");
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty({x.size(0), n}, x.options());
  if (x.size(0) > 0) {
    if (kind == kQ4_1) gemm<kQ4_1>(xc, blocks, out);
    else gemm<kQ8_0>(xc, blocks, out);
  }
  if (bias.has_value()) out.add_(*bias);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(slotmesh_native, m) {
  m.def("block_gemm(Tensor x, Tensor blocks, int n, int kind, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(slotmesh_native, CPU, m) {
  m.impl("block_gemm", &block_gemm);
}
