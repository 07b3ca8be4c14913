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
  // Fused residual add + dropout + LayerNorm (docs/layer_norm.md): summed = residual +
  // dropout(input) rounded to input's dtype, out = layer_norm(summed). input and residual are
  // (rows, N) of one dtype; dropout is on when dropout_p > 0 and then needs rng (int64 (seed,
  // offset) on input's device). Returns (out, summed, mean, rstd); mean, rstd float32 (rows,).
  m.def("add_layer_norm_fwd(Tensor input, Tensor residual, Tensor? weight, Tensor? bias,"
        " Tensor? rng, float dropout_p, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  // Returns (grad_residual, grad_input, grad_weight, grad_bias): grad_residual = LN-backward of
  // grad_out + grad_summed (None: zeros); grad_input = grad_residual * keep * scale when
  // input_grad and dropout_p > 0, else an empty tensor (it equals grad_residual). grad_weight,
  // grad_bias as in layer_norm_bwd (deterministic).
  m.def("add_layer_norm_bwd(Tensor grad_out, Tensor? grad_summed, Tensor summed, Tensor mean,"
        " Tensor rstd, Tensor? weight, Tensor? bias, Tensor? rng, float dropout_p,"
        " bool input_grad, bool weight_grad, bool bias_grad) -> (Tensor, Tensor, Tensor, Tensor)");
  // RMSNorm (docs/rms_norm.md): layer_norm without centring or bias on the same kernels.
  // Returns (output, rstd), rstd float32 (rows,); the add_ variant fuses residual + dropout as
  // add_layer_norm does and returns (out, summed, rstd), its backward (grad_residual,
  // grad_input (empty unless input_grad and dropout_p > 0), grad_weight). grad_weight has
  // weight's shape and dtype when weight_grad, else it is an empty float32 tensor.
  m.def("rms_norm_fwd(Tensor input, Tensor? weight, float eps) -> (Tensor, Tensor)");
  m.def("rms_norm_bwd(Tensor grad_out, Tensor input, Tensor rstd, Tensor? weight,"
        " bool weight_grad) -> (Tensor, Tensor)");
  m.def("add_rms_norm_fwd(Tensor input, Tensor residual, Tensor? weight, Tensor? rng,"
        " float dropout_p, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("add_rms_norm_bwd(Tensor grad_out, Tensor? grad_summed, Tensor summed, Tensor rstd,"
        " Tensor? weight, Tensor? rng, float dropout_p, bool input_grad, bool weight_grad)"
        " -> (Tensor, Tensor, Tensor)");

  // Gated linear units (docs/glu.md): out = act(gate) * up elementwise, gate and up of one
  // shape and dtype; activation 0 = silu (SwiGLU), 1 = gelu tanh, 2 = gelu erf (GeGLU). The
  // backward recomputes act(gate) and returns (grad_gate, grad_up).
  m.def("glu_fwd(Tensor gate, Tensor up, int activation) -> Tensor");
  m.def("glu_bwd(Tensor grad_out, Tensor gate, Tensor up, int activation) -> (Tensor, Tensor)");

  // Rotary embeddings (docs/rotary.md) of q (B,Hq,S,D) and k (B,Hk,S,D) in one launch, any
  // strides with a unit last stride; cos and sin (1 or B, S, D), q's dtype or float32:
  // out = x * cos + rotate(x) * sin with rotate the rotate-half (or, interleaved, the GPT-J
  // pair) rotation. Returns (q_out, k_out) with q's and k's strides. The backward applies the
  // transposed rotation to (grad_q, grad_k).
  m.def("rotary_fwd(Tensor q, Tensor k, Tensor cos, Tensor sin, bool interleaved)"
        " -> (Tensor, Tensor)");
  m.def("rotary_bwd(Tensor grad_q, Tensor grad_k, Tensor cos, Tensor sin, bool interleaved)"
        " -> (Tensor, Tensor)");

  // One fused Adam/AdamW step over lists of tensors on one device (fastlm/ops/adam.py says
  // what each argument means). Arithmetic in float32; params float32/float16/bfloat16; the
  // moments the params' dtype or float32; `masters` (float32) empty or one per param;
  // `max_exp_avg_sqs` empty unless amsgrad; `steps` are float32 scalars already incremented.
  // grad_scale divides the grads; a found_inf != 0 skips the step; clip_coef multiplies the
  // (unscaled) grads. lr_tensor, when given, replaces lr.
  m.def("adam_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs,"
        " Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] masters,"
        " Tensor[] steps, float lr, Tensor? lr_tensor, float beta1, float beta2, float eps,"
        " float weight_decay, bool decoupled, bool amsgrad, bool maximize, Tensor? grad_scale,"
        " Tensor? found_inf, Tensor? clip_coef) -> ()");
  // Sum of squares of all elements of all tensors (one device), float32 scalar, computed in
  // float32 with per-chunk partial sums added in a fixed order.
  m.def("sum_of_squares(Tensor[] tensors) -> Tensor");

  // Scaled dot-product attention on the canonical layout q (B,Hq,L,E), k (B,Hk,S,E),
  // v (B,Hk,S,Ev), Hq a multiple of Hk; mask None or (B,Hq,L,S) with any strides, bool
  // (True = attend) or additive float; rng None or int64 (seed, offset) on q's device.
  // Returns (out (B,Hq,L,Ev) in q's dtype, lse (B,Hq,L) float32). docs/attention.md is the
  // contract: the math, empty rows (zeros, lse = +inf) and the dropout bits.
  // The options after scale (docs/attention.md, "Causal, windows, soft-capping"): keys j that
  // query i may attend lie within window_left below and window_right above its diagonal (-1:
  // unbounded; is_causal caps window_right at 0), the diagonal at key i or, with lower_right,
  // at key i + S - L; softcap > 0 caps the scaled scores at softcap * tanh(s / softcap)
  // before the masks. The defaults are the plain op.
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor? rng,"
        " float dropout_p, bool is_causal, float scale, int window_left=-1,"
        " int window_right=-1, bool lower_right=False, float softcap=0.0) -> (Tensor, Tensor)");
  // Returns (grad_q, grad_k, grad_v), deterministic (fixed-order sums, no float atomics).
  m.def("attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,"
        " Tensor? mask, Tensor? rng, float dropout_p, bool is_causal, float scale,"
        " int window_left=-1, int window_right=-1, bool lower_right=False, float softcap=0.0)"
        " -> (Tensor, Tensor, Tensor)");
  // Attention over packed sequences (varlen): q (total_q,Hq,E), k (total_k,Hk,E),
  // v (total_k,Hk,Ev); cu_seqlens_q/_k int32 or int64 (n+1) offsets: sequence b is rows
  // cu_q[b]..cu_q[b+1] of q attending to rows cu_k[b]..cu_k[b+1] of k and v; max_seqlen_q/_k
  // bound the lengths. Returns (out (total_q,Hq,Ev) in q's dtype, lse (Hq,total_q) float32).
  // Equal to attention_fwd on the padded (n,Hq,max_q,*) problem with a key-padding mask,
  // dropout bits included (docs/attention.md, "Varlen").
  // The options as attention_fwd's, the diagonal aligned with each sequence's own lengths.
  m.def("varlen_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q,"
        " Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, Tensor? rng,"
        " float dropout_p, bool is_causal, float scale, int window_left=-1,"
        " int window_right=-1, bool lower_right=False, float softcap=0.0) -> (Tensor, Tensor)");
  m.def("varlen_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out,"
        " Tensor lse, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q,"
        " int max_seqlen_k, Tensor? rng, float dropout_p, bool is_causal, float scale,"
        " int window_left=-1, int window_right=-1, bool lower_right=False, float softcap=0.0)"
        " -> (Tensor, Tensor, Tensor)");
}
