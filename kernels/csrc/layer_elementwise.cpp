// The decoder layer's elementwise work, fused, for the eager path (prefill and mixed
// steps; the compiled decode step leaves these to inductor, which fuses them itself).
//
// Eager torch runs a bf16 RMSNorm as seven ops (widen, square, mean, add eps, rsqrt, two
// multiplies, narrow), rotary as nine and silu·mul as two, each a pass over memory with
// its own parallel region: ~16% of a 512-token SmolLM2 prefill step against ~73% in the
// GEMMs. Here each is one pass over its rows, with the same roundings as the plain-torch
// reference (kernels/rms_norm.py, rotary.py, gated_act.py): every result the reference
// stores in the activation dtype is rounded to it here too, so bf16 outputs match it bit
// for bit except where a sum of squares, added in another order, or the exponential
// (a polynomial here, Sleef there) moves a value across a rounding boundary.
//
//   slotmesh_native::rms_norm(Tensor x [..., D], Tensor weight [D], float eps,
//       float weight_offset) -> Tensor
//   slotmesh_native::add_rms_norm(Tensor x [..., D], Tensor residual, Tensor weight,
//       float eps, float weight_offset) -> (Tensor normed, Tensor sum)
//     sum = residual + x (rounded to the dtype), normed = RMSNorm(sum): the residual add
//     of one block and the norm opening the next, in one pass.
//   slotmesh_native::rotary(Tensor x [T, H, D], Tensor cos_sin [T, D] fp32) -> Tensor
//     NEOX layout: cos in cos_sin's first half, sin in the second.
//   slotmesh_native::gated_act(Tensor gate_up [..., 2I], int kind) -> Tensor [..., I]
//     act(gate) * up, kind 0 silu, 1 gelu (tanh approximation).
// x, residual, weight, gate_up: fp32 or bf16, all alike; the last dim contiguous, at most
// two leading dims with any strides (views of the fused projections are read in place).
// Outputs are contiguous, in x's dtype.

// the reference rounds every product before it adds: no fused multiply-adds here
#pragma GCC optimize("fp-contract=off")

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "exp_poly.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

// Element types: float, or a bf16 held as its bits (uint16_t: loops over c10::BFloat16
// objects copy them as structs, which GCC does not vectorise)
inline float widen(float x) { return x; }
inline float widen(uint16_t x) {  // bf16 is the top half of an fp32
  const uint32_t bits = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// fp32 → bf16, round to nearest even (what torch does), NaN kept a NaN; branch-free so
// that the loops around it vectorise
inline uint16_t bf16_bits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return v != v ? uint16_t{0x7FC0} : static_cast<uint16_t>(rounded);
}

template <typename T>
inline T narrow(float v);
template <>
inline float narrow<float>(float v) { return v; }
template <>
inline uint16_t narrow<uint16_t>(float v) { return bf16_bits(v); }

// a tensor's data as T (bf16 as its bits)
template <typename T>
inline T* data(const at::Tensor& t) {
  if constexpr (std::is_same_v<T, float>) return t.data_ptr<float>();
  else return reinterpret_cast<uint16_t*>(t.data_ptr<c10::BFloat16>());
}
// v as the reference holds it after storing it in T
template <typename T>
inline float rounded(float v) { return widen(narrow<T>(v)); }

// e^x, x clamped to [-87, 88]: e^-87 ~ 1.6e-38 stands in for anything smaller (as 1 + it,
// or x over 1 + its inverse, it changes nothing at fp32 precision)
inline float exp_clamped(float x) {
  return slotmesh::exp_in_range(std::min(std::max(x, -87.f), 88.f));
}

inline float silu(float g) { return g / (1.f + exp_clamped(-g)); }
inline float gelu_tanh(float g) {  // 0.5 g (1 + tanh(√(2/π)(g + 0.044715 g³))), torch's form
  const float inner = 0.7978845608028654f * (g + 0.044715f * g * g * g);
  const float e = exp_clamped(2.f * inner);
  const float tanh = (e - 1.f) / (e + 1.f);  // near −1 as finely as a rounded tanh is
  return 0.5f * g * (1.f + tanh);
}

// A [A, B, D] view's row r (of A × B) as a pointer: at most two leading dims, any strides.
struct Rows {
  int64_t count, inner, stride0, stride1;
  explicit Rows(const at::Tensor& t)
      : count(1), inner(1), stride0(0), stride1(0) {
    const int64_t lead = t.dim() - 1;
    if (lead == 1) {
      count = t.size(0);
      stride0 = t.stride(0);
    } else if (lead == 2) {
      count = t.size(0) * t.size(1);
      inner = t.size(1);
      stride0 = t.stride(0);
      stride1 = t.stride(1);
    }
  }
  int64_t offset(int64_t r) const { return (r / inner) * stride0 + (r % inner) * stride1; }
};

void check_rows(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be on the CPU");
  TORCH_CHECK(t.dim() >= 1 && t.dim() <= 3, op, ": ", name, " must have 1-3 dims, got ",
              t.dim());
  TORCH_CHECK(t.stride(-1) == 1 || t.size(-1) == 1, op, ": ", name,
              "'s last dim must be contiguous");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, op, ": ",
              name, " must be fp32 or bf16, got ", t.scalar_type());
}

// rows of about `work` elements each: a parallel region only where there is work to share
inline int64_t grain(int64_t width) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(width, 1)); }

// Sum of squares of a row, in 16 partial sums (vectorised without reassociation flags).
inline float sum_squares(const float* h, int64_t d) {
  float acc[16] = {0.f};
  int64_t i = 0;
  for (; i + 16 <= d; i += 16) {
#pragma omp simd
    for (int j = 0; j < 16; ++j) acc[j] += h[i + j] * h[i + j];
  }
  float s = 0.f;
  for (; i < d; ++i) s += h[i] * h[i];
  for (int j = 0; j < 16; ++j) s += acc[j];
  return s;
}

// One row: h (fp32, as stored in T) → out. Llama (offset 0) rounds the normalised row to T
// before the weight multiply; Gemma multiplies by (offset + w) in fp32 and rounds last.
template <typename T>
inline void normalise_row(const float* __restrict h, const T* __restrict w, T* __restrict out,
                          int64_t d, float eps, float offset) {
  const float inv = 1.f / std::sqrt(sum_squares(h, d) / static_cast<float>(d) + eps);
  if (offset == 0.f) {
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) out[i] = narrow<T>(widen(w[i]) * rounded<T>(h[i] * inv));
  } else {
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) out[i] = narrow<T>(h[i] * inv * (offset + widen(w[i])));
  }
}

// sum = residual + x rounded as the reference's add rounds it, kept widened in h too
template <typename T>
inline void add_row(const T* __restrict x, const T* __restrict residual, T* __restrict sum,
                    float* __restrict h, int64_t d) {
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) {
    const T s = narrow<T>(widen(residual[i]) + widen(x[i]));
    sum[i] = s;
    h[i] = widen(s);
  }
}

template <typename T>
inline void widen_row(const T* __restrict x, float* __restrict h, int64_t d) {
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) h[i] = widen(x[i]);
}

template <typename T>
void norm_rows(const at::Tensor& x, const at::Tensor* residual, const at::Tensor& weight,
               at::Tensor& out, at::Tensor* sum, double eps, double offset) {
  const int64_t d = x.size(-1);
  const Rows xr(x);
  const Rows rr = residual ? Rows(*residual) : xr;
  const T* xp = data<T>(x);
  const T* rp = residual ? data<T>(*residual) : nullptr;
  const T* wp = data<T>(weight);
  T* op = data<T>(out);
  T* sp = sum ? data<T>(*sum) : nullptr;
  at::parallel_for(0, xr.count, grain(d), [&](int64_t begin, int64_t end) {
    std::vector<float> h(d);
    for (int64_t r = begin; r < end; ++r) {
      if (rp)
        add_row(xp + xr.offset(r), rp + rr.offset(r), sp + r * d, h.data(), d);
      else
        widen_row(xp + xr.offset(r), h.data(), d);
      normalise_row(h.data(), wp, op + r * d, d, static_cast<float>(eps),
                    static_cast<float>(offset));
    }
  });
}

void check_norm(const at::Tensor& x, const at::Tensor& weight, const char* op) {
  check_rows(x, op, "x");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(-1) && weight.is_contiguous(),
              op, ": weight must be a contiguous [", x.size(-1), "], got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, ": weight dtype ",
              weight.scalar_type(), " != x dtype ", x.scalar_type());
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, double offset) {
  check_norm(x, weight, "rms_norm");
  at::Tensor out = at::empty(x.sizes(), x.options());
  if (x.scalar_type() == at::kFloat)
    norm_rows<float>(x, nullptr, weight, out, nullptr, eps, offset);
  else
    norm_rows<uint16_t>(x, nullptr, weight, out, nullptr, eps, offset);
  return out;
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                const at::Tensor& weight, double eps,
                                                double offset) {
  check_norm(x, weight, "add_rms_norm");
  check_rows(residual, "add_rms_norm", "residual");
  TORCH_CHECK(residual.sizes() == x.sizes() && residual.scalar_type() == x.scalar_type(),
              "add_rms_norm: residual ", residual.sizes(), " ", residual.scalar_type(),
              " does not match x ", x.sizes(), " ", x.scalar_type());
  at::Tensor out = at::empty(x.sizes(), x.options());
  at::Tensor sum = at::empty(x.sizes(), x.options());
  if (x.scalar_type() == at::kFloat)
    norm_rows<float>(x, &residual, weight, out, &sum, eps, offset);
  else
    norm_rows<uint16_t>(x, &residual, weight, out, &sum, eps, offset);
  return {out, sum};
}

// x1·cos − x2·sin, x2·cos + x1·sin with cos, sin in T and every product rounded to T.
template <typename T>
inline void rotate_row(const T* __restrict x, const float* __restrict c,
                       const float* __restrict s, T* __restrict out, int64_t half) {
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = widen(x[i]), x2 = widen(x[half + i]);
    out[i] = narrow<T>(rounded<T>(x1 * c[i]) - rounded<T>(x2 * s[i]));
    out[half + i] = narrow<T>(rounded<T>(x2 * c[i]) + rounded<T>(x1 * s[i]));
  }
}

template <typename T>
void rotate_rows(const at::Tensor& x, const at::Tensor& cos_sin, at::Tensor& out) {
  const int64_t tokens = x.size(0), heads = x.size(1), d = x.size(2), half = d / 2;
  const Rows xr(x);
  const T* xp = data<T>(x);
  const float* cp = cos_sin.data_ptr<float>();
  T* op = data<T>(out);
  at::parallel_for(0, tokens, grain(heads * d), [&](int64_t begin, int64_t end) {
    std::vector<float> c(half), s(half);
    for (int64_t t = begin; t < end; ++t) {
      const float* row = cp + t * cos_sin.stride(0);
#pragma omp simd
      for (int64_t i = 0; i < half; ++i) {
        c[i] = rounded<T>(row[i]);
        s[i] = rounded<T>(row[half + i]);
      }
      for (int64_t h = 0; h < heads; ++h)
        rotate_row(xp + xr.offset(t * heads + h), c.data(), s.data(), op + (t * heads + h) * d,
                   half);
    }
  });
}

at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos_sin) {
  check_rows(x, "rotary", "x");
  TORCH_CHECK(x.dim() == 3 && x.size(2) % 2 == 0, "rotary: x must be [T, H, even D], got ",
              x.sizes());
  TORCH_CHECK(cos_sin.dim() == 2 && cos_sin.size(0) == x.size(0) &&
                  cos_sin.size(1) == x.size(2) && cos_sin.stride(1) == 1 &&
                  cos_sin.scalar_type() == at::kFloat,
              "rotary: cos_sin must be fp32 [", x.size(0), ", ", x.size(2),
              "] with contiguous rows, got ", cos_sin.sizes(), " ", cos_sin.scalar_type());
  at::Tensor out = at::empty(x.sizes(), x.options());
  if (x.scalar_type() == at::kFloat)
    rotate_rows<float>(x, cos_sin, out);
  else
    rotate_rows<uint16_t>(x, cos_sin, out);
  return out;
}

// act(gate) rounded to T (the reference's activation output), times up, rounded again
template <typename T, int Kind>
inline void gate_row(const T* __restrict gate, const T* __restrict up, T* __restrict out,
                     int64_t width) {
#pragma omp simd
  for (int64_t i = 0; i < width; ++i) {
    const float g = widen(gate[i]);
    const float a = rounded<T>(Kind == 0 ? silu(g) : gelu_tanh(g));
    out[i] = narrow<T>(a * widen(up[i]));
  }
}

template <typename T, int Kind>
void gate_rows(const at::Tensor& gate_up, at::Tensor& out) {
  const int64_t width = out.size(-1);
  const Rows gr(gate_up);
  const T* gp = data<T>(gate_up);
  T* op = data<T>(out);
  at::parallel_for(0, gr.count, grain(2 * width), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* gate = gp + gr.offset(r);
      gate_row<T, Kind>(gate, gate + width, op + r * width, width);
    }
  });
}

at::Tensor gated_act(const at::Tensor& gate_up, int64_t kind) {
  check_rows(gate_up, "gated_act", "gate_up");
  TORCH_CHECK(gate_up.size(-1) % 2 == 0, "gated_act: gate_up's last dim must be even, got ",
              gate_up.size(-1));
  TORCH_CHECK(kind == 0 || kind == 1, "gated_act: kind must be 0 (silu) or 1 (gelu tanh)");
  std::vector<int64_t> shape(gate_up.sizes().begin(), gate_up.sizes().end());
  shape.back() /= 2;
  at::Tensor out = at::empty(shape, gate_up.options());
  const bool fp32 = gate_up.scalar_type() == at::kFloat;
  if (kind == 0)
    fp32 ? gate_rows<float, 0>(gate_up, out) : gate_rows<uint16_t, 0>(gate_up, out);
  else
    fp32 ? gate_rows<float, 1>(gate_up, out) : gate_rows<uint16_t, 1>(gate_up, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(slotmesh_native, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps, float weight_offset) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps, "
        "float weight_offset) -> (Tensor, Tensor)");
  m.def("rotary(Tensor x, Tensor cos_sin) -> Tensor");
  m.def("gated_act(Tensor gate_up, int kind) -> Tensor");
}

TORCH_LIBRARY_IMPL(slotmesh_native, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("rotary", &rotary);
  m.impl("gated_act", &gated_act);
}
