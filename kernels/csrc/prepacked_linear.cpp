// y = x Wᵀ + b through oneDNN with W prepacked by `torch.ops.mkldnn._reorder_linear_weight`
// (an opaque mkldnn tensor in oneDNN's blocked layout for bf16/fp32 GEMMs).
//
// Inductor prepacks the weights of a frozen graph this way, but a frozen graph holds them
// as constants, which its disk cache cannot pickle: every start compiles anew. Here the
// prepacked weight is an input of the graph, so the graph need not freeze and the cache
// serves it. Inductor lowers `mkldnn::_linear_pointwise` itself only for a constant
// weight (its lowering asserts otherwise); this op is opaque to it and calls the same
// kernel through the dispatcher.
//
//   slotmesh_native::prepacked_linear(Tensor x [M, K], Tensor packed, Tensor? bias,
//       int n) -> Tensor [M, n]
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>
#include <string>

namespace {

at::Tensor prepacked_linear(const at::Tensor& x, const at::Tensor& packed,
                            const std::optional<at::Tensor>& bias, int64_t n) {
  TORCH_CHECK(x.dim() == 2, "prepacked_linear: x must be [M, K], got ", x.sizes());
  TORCH_CHECK(packed.is_mkldnn(), "prepacked_linear: the weight must be prepacked (mkldnn)");
  static const c10::OperatorHandle op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  torch::jit::Stack stack;
  stack.emplace_back(x.contiguous());
  stack.emplace_back(packed);
  stack.emplace_back(bias.has_value() ? c10::IValue(*bias) : c10::IValue());
  stack.emplace_back(std::string("none"));
  stack.emplace_back(c10::List<std::optional<at::Scalar>>());
  stack.emplace_back(c10::IValue());  // algorithm: none
  op.callBoxed(&stack);
  at::Tensor out = stack.back().toTensor();
  TORCH_CHECK(out.size(-1) == n, "prepacked_linear: weight gives ", out.size(-1),
              " outputs, expected ", n);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(slotmesh_native, m) {
  m.def("prepacked_linear(Tensor x, Tensor packed, Tensor? bias, int n) -> Tensor");
}

TORCH_LIBRARY_IMPL(slotmesh_native, CPU, m) {
  m.impl("prepacked_linear", &prepacked_linear);
}

// the prepacked weight's dispatch key wins over x's
TORCH_LIBRARY_IMPL(slotmesh_native, MkldnnCPU, m) {
  m.impl("prepacked_linear", &prepacked_linear);
}
