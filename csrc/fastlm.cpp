// Every fastlm op schema, in one place. Kernels register in csrc/cpu/*.cpp and csrc/cuda/*.cu;
// fake (meta) kernels and autograd are registered in Python (fastlm/ops/*.py).
#include <torch/library.h>

TORCH_LIBRARY(fastlm, m) {
  // LayerNorm over the last dimension of a 2-D (rows, N) input; callers flatten
  // normalized_shape into N. Returns (output, mean, rstd); mean and rstd are float32 (rows,).
  m.def("layer_norm_fwd(Tensor input, Tensor? weight, Tensor? bias, float eps)"
        " -> (Tensor, Tensor, Tensor)");
  // Returns (grad_input, grad_weight, grad_bias). grad_weight (grad_bias) has weight's (bias')
  // shape and dtype when weight_grad (bias_grad) is set, else it is an empty float32 tensor.
  // dweight/dbias are reduced deterministically: per-block partial sums, then a fixed-order sum.
  m.def("layer_norm_bwd(Tensor grad_out, Tensor input, Tensor mean, Tensor rstd, Tensor? weight,"
        " Tensor? bias, bool weight_grad, bool bias_grad) -> (Tensor, Tensor, Tensor)");
}
