// FBGEMM's fp16-weight GEMM (fp32 activations), spread over torch's intra-op threads.
//
// torch's own aten::fbgemm_linear_fp16_weight_fp32_activation runs FBGEMM's kernel on one
// thread (it never passes thread_id / num_threads), and keeps the packed matrix behind an
// opaque handle. Here the packed matrix is an ordinary torch fp16 tensor (it can be cloned,
// moved and traced), and one call splits the output columns over at::parallel_for, the
// partition FBGEMM's cblas_gemm_compute does itself when given a thread id.
//
//   slotmesh_native::fp16_pack(Tensor weight [N, K] float) -> Tensor packed (fp16, 1-D)
//   slotmesh_native::fp16_gemm(Tensor x [M, K] float, Tensor packed, int N, Tensor? bias)
//       -> Tensor [M, N] float
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>

// torch's wheel ships FBGEMM's headers but not asmjit's, which they include, so the few
// declarations used here are restated: the exported packing constructor, the GEMM and the
// packed matrix's data members (FbgemmPackMatrixB.h, in declaration order). Nothing
// else of the class is used. `native_fp16_available` in kernels/fp16_linear.py checks this
// against torch's own FBGEMM op before the op is trusted (a layout change disables it).
namespace fbgemm {
enum class matrix_op_t { NoTranspose, Transpose };
template <typename T> struct TypeConverter;
void fbgemmAlignedFree(void* p);

template <typename T, typename C = TypeConverter<T>>
class PackedGemmMatrixB {
 public:
  // FBGEMM's: packs Wᵀ from smat (rounding to fp16), into memory it allocates
  PackedGemmMatrixB(matrix_op_t trans, int nrow, int ncol, float alpha, const float* smat,
                    int brow);
  // ours: a view of packed memory owned elsewhere
  PackedGemmMatrixB(int nrow, int ncol, int brow, int bcol, void* pmat, uint64_t size)
      : nrow_(nrow), ncol_(ncol), brow_(brow),
        last_brow_(nrow % brow ? nrow % brow : brow), bcol_(bcol),
        nbrow_((nrow + brow - 1) / brow), nbcol_((ncol + bcol - 1) / bcol), size_(size),
        kernel_ncol_blocks_(2), pmat_(static_cast<T*>(pmat)), packed_(true),
        pmat_passed_in(true) {}
  PackedGemmMatrixB(const PackedGemmMatrixB&) = delete;
  PackedGemmMatrixB& operator=(const PackedGemmMatrixB&) = delete;
  ~PackedGemmMatrixB() {
    if (!pmat_passed_in) fbgemmAlignedFree(pmat_);
  }

  int nrow_, ncol_;
  int brow_, last_brow_, bcol_;
  int nbrow_, nbcol_;
  uint64_t size_;
  int kernel_ncol_blocks_;
  T* pmat_;
  bool packed_{false};
  bool pmat_passed_in{false};
};

using float16 = std::uint16_t;
using PackedGemmMatrixFP16 = PackedGemmMatrixB<float16>;

template <typename T>
void cblas_gemm_compute(matrix_op_t transa, int m, const float* A,
                        const PackedGemmMatrixB<T>& Bp, float beta, float* C,
                        int thread_id, int num_threads);
}  // namespace fbgemm

namespace {

using fbgemm::PackedGemmMatrixFP16;

constexpr int kBlockRows = 512;  // FBGEMM's default block of K rows (brow)

// The packed layout's column block: FBGEMM chooses it from the CPU (AVX2: 16, AVX-512: 32).
int block_cols() {
  static const int bcol = [] {
    float zeros[16 * 16] = {0.f};
    PackedGemmMatrixFP16 probe(fbgemm::matrix_op_t::Transpose, 16, 16, 1.f, zeros,
                               kBlockRows);
    return probe.bcol_;
  }();
  return bcol;
}

int64_t packed_numel(int64_t n, int64_t k) {
  // FBGEMM allocates K rounded up to its row block, but its last block of rows is stored
  // compactly (last_brow rows per column block), so the matrix ends after K rows
  const int64_t bcol = block_cols();
  return k * ((n + bcol - 1) / bcol) * bcol;
}

void check_packed(const at::Tensor& packed, int64_t n, int64_t k) {
  TORCH_CHECK(packed.device().is_cpu() && packed.scalar_type() == at::kHalf &&
                  packed.dim() == 1 && packed.is_contiguous(),
              "fp16_gemm: packed must be a contiguous 1-D fp16 CPU tensor");
  TORCH_CHECK(packed.numel() == packed_numel(n, k), "fp16_gemm: packed holds ",
              packed.numel(), " values, a [", n, ", ", k, "] weight packs to ",
              packed_numel(n, k));
  TORCH_CHECK(reinterpret_cast<uintptr_t>(packed.data_ptr()) % 64 == 0,
              "fp16_gemm: packed must be 64-byte aligned");
}

at::Tensor fp16_pack(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.device().is_cpu(),
              "fp16_pack: weight must be a 2-D CPU tensor");
  const int64_t n = weight.size(0), k = weight.size(1);
  at::Tensor w = weight.to(at::kFloat).contiguous();
  // FBGEMM packs Wᵀ ([K, N], given as W [N, K] with Transpose), rounding to fp16
  PackedGemmMatrixFP16 src(fbgemm::matrix_op_t::Transpose, static_cast<int>(k),
                           static_cast<int>(n), 1.f, w.data_ptr<float>(), kBlockRows);
  TORCH_CHECK(src.nrow_ == k && src.ncol_ == n && src.brow_ == kBlockRows &&
                  src.bcol_ == block_cols() && src.packed_ && src.pmat_ != nullptr &&
                  static_cast<int64_t>(src.size_) ==
                      (k + kBlockRows - 1) / kBlockRows * kBlockRows * packed_numel(n, k) / k,
              "fp16_pack: FBGEMM's packed matrix is not laid out as expected");
  at::Tensor packed = at::empty({packed_numel(n, k)}, weight.options().dtype(at::kHalf));
  std::memcpy(packed.data_ptr(), src.pmat_, packed.numel() * sizeof(fbgemm::float16));
  return packed;
}

at::Tensor fp16_gemm(const at::Tensor& x, const at::Tensor& packed, int64_t n,
                     const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu() && x.scalar_type() == at::kFloat,
              "fp16_gemm: x must be a 2-D fp32 CPU tensor");
  const int64_t m = x.size(0), k = x.size(1);
  check_packed(packed, n, k);
  at::Tensor a = x.contiguous();
  at::Tensor out = at::empty({m, n}, x.options());
  if (m > 0) {
    const PackedGemmMatrixFP16 view(static_cast<int>(k), static_cast<int>(n), kBlockRows,
                                    block_cols(), packed.data_ptr(),
                                    static_cast<uint64_t>(packed.numel()));
    const float* a_ptr = a.data_ptr<float>();
    float* c_ptr = out.data_ptr<float>();
    const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
    at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        fbgemm::cblas_gemm_compute(fbgemm::matrix_op_t::NoTranspose, static_cast<int>(m),
                                   a_ptr, view, 0.f, c_ptr, static_cast<int>(t),
                                   static_cast<int>(threads));
      }
    });
  }
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, "fp16_gemm: bias must be [N]");
    out.add_(*bias);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(slotmesh_native, m) {
  m.def("fp16_pack(Tensor weight) -> Tensor");
  m.def("fp16_gemm(Tensor x, Tensor packed, int n, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(slotmesh_native, CPU, m) {
  m.impl("fp16_pack", &fp16_pack);
  m.impl("fp16_gemm", &fp16_gemm);
}
