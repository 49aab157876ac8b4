// Decode attention straight from the paged KV cache: one query token per sequence, an
// fp32 or bf16 cache (arithmetic in fp32 either way).
//
// The plain-torch path (kernels/paged_attention.py) gathers every visible block of every
// sequence into a padded copy per layer, then runs SDPA over it with an additive mask.
// Here each (sequence, KV head) reads its keys and values where they lie, through the
// block table, skips the slots its mask hides (the window's past, the padding up to the
// graph's key width), and computes all the query heads of its group in one pass over
// them. Work items go over torch's intra-op threads. With AVX-512 and a head size that is
// a multiple of 16 (64, 128, 256), a key is widened once into registers for every head of
// its group (their dot products reduced four at a time), and a value row once for up to
// four heads, whose weighted sums stay in registers over the keys. q and the mask are read
// where they lie (rows contiguous; no fp32 copies), the output written in q's dtype.
// SmolLM2's shape (9 heads, 3 KV heads, 64 wide), bf16, 200 keys: 16 sequences 147 → 103
// µs a layer, one sequence 23 → 13 µs (AVX-512 EPYC, 2 threads, alternating in one
// process), against the version that reduced each dot product alone and converted q, the
// mask and the output in separate passes.
//
//   slotmesh_native::paged_decode_attention(
//       Tensor q [B, H, D], Tensor k_cache [blocks, block_size, kv_heads, D],
//       Tensor v_cache (same), Tensor block_tables [B, n] int64,
//       Tensor mask [B, n * block_size] additive (0 or -inf), float scale)
//       -> Tensor [B, H, D] in q's dtype; q, caches and mask all fp32 or all bf16
//
//   slotmesh_native::write_kv(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k [T, kvh, D],
//       Tensor v, Tensor slot_mapping [T] int64) -> ()
// writes the step's new keys and values into their flat cache slots (in place; any
// dtype, k / v cast to the cache's; rows of the cache's dtype whose [kvh, D] part is
// contiguous, such as a view of the fused qkv projection, are copied where they lie). The plain-torch version is two index_copy_ calls in
// a Python custom op, whose call from a compiled graph costs ~25 µs a layer in Python.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "exp_poly.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kMaxGroup = 16;  // query heads a KV head serves, on the vector path

inline float widen(float x) { return x; }
inline int64_t round16(int64_t n) { return (n + 15) / 16 * 16; }
// a work item's scratch: the query rows and value sums first, each 64-byte aligned (a
// vector load across two cache lines costs two), then scores, the mask row, max and sum
inline int64_t scratch_floats(int64_t group, int64_t keys, int64_t dim) {
  return 16 + 2 * round16(group * dim) + round16(group * keys) + round16(keys) + 2 * group;
}
inline float* aligned64(float* p) {
  const auto bits = reinterpret_cast<std::uintptr_t>(p);
  return reinterpret_cast<float*>((bits + 63) & ~static_cast<std::uintptr_t>(63));
}
inline float widen(c10::BFloat16 x) {  // bf16 is the top half of an fp32
  const uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

template <typename T>
inline float dot(const float* a, const T* b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * widen(b[i]);
  return s;
}

// e^x for x <= 0 (a softmax numerator); below -87 (and -inf) it gives 0
inline float exp_nonpositive(float x) {
  return x < -87.f ? 0.f : slotmesh::exp_in_range(x);
}

template <typename T>
inline void axpy(float alpha, const T* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * widen(x[i]);
}

#if defined(__AVX512F__)
#define SLOTMESH_ATTN_AVX512 1
// 16 cache values as fp32 (a bf16 is the top half of its fp32)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// Four 16-lane partial sums → their four totals: two rounds of in-lane unpacks and adds,
// then the four 128-bit lanes added (13 operations, where four _mm512_reduce_add_ps take 32)
inline __m128 reduce4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
  const __m512 t0 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
  const __m512 t1 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
  const __m512d d0 = _mm512_castps_pd(t0), d1 = _mm512_castps_pd(t1);
  const __m512 u = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(d0, d1)),
                                 _mm512_castpd_ps(_mm512_unpackhi_pd(d0, d1)));
  // each 128-bit lane of u: [a0, a1, a2, a3] summed over that lane's part
  const __m256 v = _mm256_add_ps(
      _mm512_castps512_ps256(u),
      _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(u), 1)));
  return _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
}

// <q, k> for a head size D (a multiple of 16): the key widened once into registers, the
// group's heads reduced four at a time. out: group floats (rounded up to 4 writable).
template <typename T, int D>
inline void key_scores(const float* qrows, const T* krow, int64_t group, float* out) {
  __m512 k[D / 16];
#pragma GCC unroll 16
  for (int v = 0; v < D / 16; ++v) k[v] = load16(krow + 16 * v);
  for (int64_t g0 = 0; g0 < group; g0 += 4) {
    __m512 acc[4];
#pragma GCC unroll 4
    for (int64_t g = 0; g < 4; ++g) {
      if (g0 + g >= group) {
        acc[g] = _mm512_setzero_ps();
        continue;
      }
      const float* qg = qrows + (g0 + g) * D;
      acc[g] = _mm512_mul_ps(_mm512_loadu_ps(qg), k[0]);
#pragma GCC unroll 16
      for (int v = 1; v < D / 16; ++v)
        acc[g] = _mm512_fmadd_ps(_mm512_loadu_ps(qg + 16 * v), k[v], acc[g]);
    }
    _mm_storeu_ps(out + g0, reduce4(acc[0], acc[1], acc[2], acc[3]));
  }
}
#endif

template <typename T>
struct Args {
  const T *q, *k, *v;  // q: rows of `dim` contiguous values, strides q_batch, q_head
  const int64_t* tables;
  const T* mask;  // rows of `keys`, stride mask_batch
  T* out;  // [B, heads, dim] contiguous
  int64_t heads, dim, block_size, kv_heads, width, keys, group, s_block, s_slot, s_head;
  int64_t q_batch, q_head, mask_batch;
  float scale;
};

// One (sequence, KV head) work item: item = b * kv_heads + h. D: the head size when the
// caller fixed it at compile time, else 0 (a.dim). scratch: scratch_floats(group, keys,
// dim) floats. The group's query rows and the sequence's mask row are widened to fp32
// into the scratch first (a few hundred values), the output rounded to T at the end.
template <typename T, int D>
void attend(const Args<T>& a, int64_t item, float* scratch) {
  const int64_t dim = D > 0 ? D : a.dim, keys = a.keys, group = a.group;
  const int64_t block_size = a.block_size;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const int64_t b = item / a.kv_heads, h = item % a.kv_heads;
  const int64_t* trow = a.tables + b * a.width;
  float* qrow = aligned64(scratch);  // [group, dim] the group's query rows
  float* acc = qrow + round16(group * dim);  // [group, dim]
  float* scores = acc + round16(group * dim);  // [group, keys]
  float* mrow = scores + round16(group * keys);  // [keys] the sequence's mask row
  float* peak = mrow + round16(keys);  // [group] largest score
  float* total = peak + group;  // [group] softmax denominator
  for (int64_t g = 0; g < group; ++g) {
    const T* src = a.q + b * a.q_batch + (h * group + g) * a.q_head;
    for (int64_t i = 0; i < dim; ++i) qrow[g * dim + i] = widen(src[i]);
  }
  const T* msrc = a.mask + b * a.mask_batch;
  for (int64_t j = 0; j < keys; ++j) mrow[j] = widen(msrc[j]);
  // raw q·k of the visible keys (the hidden ones are skipped: their entries stay unset)
  for (int64_t i = 0; i < a.width; ++i) {  // block by block: no division per key
    const T* kblock = a.k + trow[i] * a.s_block + h * a.s_head;
    for (int64_t j = i * block_size; j < (i + 1) * block_size; ++j) {
      if (mrow[j] == neg_inf) continue;
      const T* krow = kblock + (j - i * block_size) * a.s_slot;
#ifdef SLOTMESH_ATTN_AVX512
      if constexpr (D > 0 && D % 16 == 0) {
        if (group <= kMaxGroup) {
          float dots[kMaxGroup + 3];
          key_scores<T, D>(qrow, krow, group, dots);
          for (int64_t g = 0; g < group; ++g) scores[g * keys + j] = dots[g];
          continue;
        }
      }
#endif
      for (int64_t g = 0; g < group; ++g) scores[g * keys + j] = dot(qrow + g * dim, krow, dim);
    }
  }
  // scaled and masked (a hidden key's unset entry becomes -inf), each head's largest
  const float scale = a.scale;
  for (int64_t g = 0; g < group; ++g) {
    float* sg = scores + g * keys;
    float top = neg_inf;
#pragma omp simd reduction(max : top)
    for (int64_t j = 0; j < keys; ++j) {
      const float s = mrow[j] == neg_inf ? neg_inf : sg[j] * scale + mrow[j];
      sg[j] = s;
      top = std::max(top, s);
    }
    peak[g] = top;
  }
  // softmax numerators in one vectorised pass per head, then V
  for (int64_t g = 0; g < group; ++g) {
    float* sg = scores + g * keys;
    const float top = peak[g];
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < keys; ++j) {
      const float e = exp_nonpositive(sg[j] - top);
      sg[j] = e;
      sum += e;
    }
    total[g] = sum;
  }
#ifdef SLOTMESH_ATTN_AVX512
  if constexpr (D > 0 && D % 16 == 0) {
    // a few heads per pass over the values, all their D sums in registers (16 vectors):
    // each value row is read and widened once for the pass, not once per head
    constexpr int64_t kHeads = D <= 64 ? 4 : (D <= 128 ? 2 : 1);
    for (int64_t g0 = 0; g0 < group; g0 += kHeads) {
      const int64_t heads = std::min(kHeads, group - g0);
      __m512 sum[kHeads][D / 16];
#pragma GCC unroll 4
      for (int64_t g = 0; g < kHeads; ++g) {
#pragma GCC unroll 16
        for (int v = 0; v < D / 16; ++v) sum[g][v] = _mm512_setzero_ps();
      }
      const float* p0 = scores + g0 * keys;
      for (int64_t i = 0; i < a.width; ++i) {
        const T* vblock = a.v + trow[i] * a.s_block + h * a.s_head;
        for (int64_t j = i * block_size; j < (i + 1) * block_size; ++j) {
          if (mrow[j] == neg_inf) continue;
          const T* vrow = vblock + (j - i * block_size) * a.s_slot;
          if constexpr (kHeads == 1) {  // D = 256: the sums take 16 registers already
            const __m512 p = _mm512_set1_ps(p0[j]);
#pragma GCC unroll 16
            for (int v = 0; v < D / 16; ++v)
              sum[0][v] = _mm512_fmadd_ps(p, load16(vrow + 16 * v), sum[0][v]);
            continue;
          }
          __m512 row[D / 16];
#pragma GCC unroll 16
          for (int v = 0; v < D / 16; ++v) row[v] = load16(vrow + 16 * v);
#pragma GCC unroll 4
          for (int64_t g = 0; g < kHeads; ++g) {
            if (g >= heads) break;
            const __m512 p = _mm512_set1_ps(p0[g * keys + j]);
#pragma GCC unroll 16
            for (int v = 0; v < D / 16; ++v) sum[g][v] = _mm512_fmadd_ps(p, row[v], sum[g][v]);
          }
        }
      }
#pragma GCC unroll 4
      for (int64_t g = 0; g < kHeads; ++g) {
        if (g >= heads) break;
#pragma GCC unroll 16
        for (int v = 0; v < D / 16; ++v)
          _mm512_storeu_ps(acc + (g0 + g) * dim + 16 * v, sum[g][v]);
      }
    }
  } else
#endif
  {
  std::fill(acc, acc + group * dim, 0.f);
  for (int64_t i = 0; i < a.width; ++i) {
    const T* vblock = a.v + trow[i] * a.s_block + h * a.s_head;
    for (int64_t j = i * block_size; j < (i + 1) * block_size; ++j) {
      if (mrow[j] == neg_inf) continue;
      const T* vrow = vblock + (j - i * block_size) * a.s_slot;
      for (int64_t g = 0; g < group; ++g) axpy(scores[g * keys + j], vrow, acc + g * dim, dim);
    }
  }
  }
  for (int64_t g = 0; g < group; ++g) {
    T* orow = a.out + (b * a.heads + h * group + g) * dim;
    // a row that sees no key (cannot happen for a real query) gives zeros, not NaN
    const float inv = total[g] > 0.f ? 1.f / total[g] : 0.f;
    for (int64_t i = 0; i < dim; ++i) orow[i] = static_cast<T>(acc[g * dim + i] * inv);
  }
}

void check(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
           const at::Tensor& tables, const at::Tensor& mask) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "paged_decode_attention: q must be [B, H, D], the caches [blocks, "
              "block_size, kv_heads, D]");
  for (const auto* t : {&q, &k_cache, &v_cache, &mask}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == k_cache.scalar_type() &&
                    (t->scalar_type() == at::kFloat || t->scalar_type() == at::kBFloat16),
                "paged_decode_attention: q, caches and mask must be CPU tensors, all fp32 "
                "or all bf16");
  }
  TORCH_CHECK(tables.scalar_type() == at::kLong && tables.dim() == 2 &&
                  tables.size(0) == q.size(0),
              "paged_decode_attention: block_tables must be int64 [B, n]");
  TORCH_CHECK(q.size(2) == k_cache.size(3) && q.size(1) % k_cache.size(2) == 0,
              "paged_decode_attention: head_dim differs, or heads are no multiple of "
              "kv heads");
  TORCH_CHECK(k_cache.stride(3) == 1 && v_cache.stride(3) == 1 &&
                  k_cache.strides() == v_cache.strides(),
              "paged_decode_attention: cache rows must be contiguous, alike in K and V");
  TORCH_CHECK(mask.dim() == 2 && mask.size(0) == q.size(0) &&
                  mask.size(1) == tables.size(1) * k_cache.size(1),
              "paged_decode_attention: mask must be [B, n * block_size]");
}

template <typename T>
at::Tensor run(const at::Tensor& q_in, const at::Tensor& k_cache, const at::Tensor& v_cache,
               const at::Tensor& tables_in, const at::Tensor& mask_in, double scale) {
  // q and mask are read where they lie when their rows are contiguous (a view of the
  // fused qkv projection is), widened per work item; the caches are read in place
  const at::Tensor q = q_in.stride(2) == 1 ? q_in : q_in.contiguous();
  const at::Tensor mask = mask_in.stride(1) == 1 ? mask_in : mask_in.contiguous();
  const at::Tensor tables = tables_in.contiguous();
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t block_size = k_cache.size(1), kv_heads = k_cache.size(2);
  const int64_t num_blocks = k_cache.size(0), width = tables.size(1);
  const int64_t keys = width * block_size, group = heads / kv_heads;
  const int64_t s_block = k_cache.stride(0), s_slot = k_cache.stride(1);
  const int64_t s_head = k_cache.stride(2);
  at::Tensor out = at::empty({batch, heads, dim}, q.options());
  const int64_t* tp = tables.data_ptr<int64_t>();

  // a bad block id must not read outside the cache
  for (int64_t i = 0; i < batch * width; ++i) {
    TORCH_CHECK(tp[i] >= 0 && tp[i] < num_blocks, "paged_decode_attention: block id ",
                tp[i], " outside the cache's ", num_blocks, " blocks");
  }

  const Args<T> args{q.data_ptr<T>(), k_cache.data_ptr<T>(), v_cache.data_ptr<T>(), tp,
                     mask.data_ptr<T>(), out.data_ptr<T>(), heads, dim, block_size,
                     kv_heads, width, keys, group, s_block, s_slot, s_head, q.stride(0),
                     q.stride(1), mask.stride(0), static_cast<float>(scale)};
  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(scratch_floats(group, keys, dim));
    for (int64_t item = begin; item < end; ++item) {
      // a fixed head size lets the compiler unroll the dot products and updates
      switch (dim) {
        case 64: attend<T, 64>(args, item, scratch.data()); break;
        case 128: attend<T, 128>(args, item, scratch.data()); break;
        case 256: attend<T, 256>(args, item, scratch.data()); break;
        default: attend<T, 0>(args, item, scratch.data());
      }
    }
  });
  return out;
}

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache,
                                  const at::Tensor& v_cache, const at::Tensor& tables,
                                  const at::Tensor& mask, double scale) {
  check(q, k_cache, v_cache, tables, mask);
  if (k_cache.scalar_type() == at::kBFloat16)
    return run<c10::BFloat16>(q, k_cache, v_cache, tables, mask, scale);
  return run<float>(q, k_cache, v_cache, tables, mask, scale);
}

void write_rows(at::Tensor& cache, const at::Tensor& rows, const int64_t* slots,
                int64_t count) {
  const int64_t width = cache.size(2) * cache.size(3);
  // rows whose [kv_heads, D] part is contiguous are copied where they lie (a view of
  // the fused qkv projection is one); others, or another dtype, through a dense copy
  const bool in_place = rows.scalar_type() == cache.scalar_type() && rows.stride(2) == 1 &&
                        rows.stride(1) == rows.size(2);
  const at::Tensor src = in_place ? rows : rows.to(cache.scalar_type()).contiguous();
  const int64_t bytes = width * cache.element_size();
  const int64_t row_bytes = src.stride(0) * src.element_size();
  char* dst = static_cast<char*>(cache.data_ptr());  // the caller checked it is contiguous
  const char* from = static_cast<const char*>(src.data_ptr());
  for (int64_t t = 0; t < count; ++t)
    std::memcpy(dst + slots[t] * bytes, from + t * row_bytes, bytes);
}

void write_kv(at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& slot_mapping) {
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  v_cache.sizes() == k_cache.sizes(),
              "write_kv: caches must be contiguous [blocks, block_size, kv_heads, D] alike");
  TORCH_CHECK(k.dim() == 3 && k.sizes() == v.sizes() && k.size(1) == k_cache.size(2) &&
                  k.size(2) == k_cache.size(3),
              "write_kv: k/v ", k.sizes(), " do not fit the cache ", k_cache.sizes());
  TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.size(0) == k.size(0) &&
                  slot_mapping.scalar_type() == at::kLong,
              "write_kv: slot_mapping must be int64 [", k.size(0), "]");
  const at::Tensor slots = slot_mapping.contiguous();
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1);
  for (int64_t t = 0; t < k.size(0); ++t)
    TORCH_CHECK(sp[t] >= 0 && sp[t] < num_slots, "write_kv: slot ", sp[t], " outside the cache's ",
                num_slots, " slots");
  write_rows(k_cache, k, sp, k.size(0));
  write_rows(v_cache, v, sp, k.size(0));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(slotmesh_native, m) {
  m.def("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, "
        "Tensor block_tables, Tensor mask, float scale) -> Tensor");
  m.def("write_kv(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v, "
        "Tensor slot_mapping) -> ()");
}

TORCH_LIBRARY_IMPL(slotmesh_native, CPU, m) {
  m.impl("paged_decode_attention", &paged_decode_attention);
  m.impl("write_kv", &write_kv);
}
