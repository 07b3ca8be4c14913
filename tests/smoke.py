"""The GPU check's smoke subset (scripts/gpu_run.sh, stage `smoke`): which `cuda` tests get the
`smoke` marker. conftest.py calls :func:`mark` at collection, so `pytest -m smoke` selects them.

The subset runs every kernel of every backend (cuda, triton; torch on CUDA tensors as the
control) at least once per dtype and per feature -- masks, causal, GQA, dropout, varlen, fused
add+LayerNorm, Adam with clipping and master weights, CUDA graph capture -- against the float64
references, and stays small enough for about two minutes on an H200 (tests/test_gpu_run.py checks
the coverage and the count from the dry run's smoke stage; scripts/gpu_run.sh records the time
estimate).

Rules are kept here, in one table, rather than as marks spread over test files that other people
edit: RULES maps "file::test function" to fnmatch patterns on the test's parameter id (``"*"``:
every parametrization). Only items that carry the `cuda` marker are marked. A pattern that
matches nothing is an error (tests/test_gpu_run.py), so a renamed test or case cannot silently
drop out of the smoke run.
"""

import fnmatch
import re

import pytest

# file::function -> patterns on the parameter id (fnmatch; "*" = all of that test's cuda items)
RULES = {
    # Attention: each mask kind, causal (L < S and L > S), GQA, a strided layout and head dim 128,
    # per dtype and backend; dropout bits exactly as documented; determinism; realistic sizes.
    "test_attention.py::test_forward_backward": [
        "*-plain-*", "*-causal-L>S-*", "*-bool-mask-LS-*", "*-float-mask-B1LS-*",
        "*-gqa-4-causal-*", "*-head-dim-128-*", "*-blhe-causal-gqa-*"],
    "test_attention.py::test_dropout_matches_reference_bits": ["*"],
    "test_attention.py::test_fully_masked_rows": ["bool-*"],
    "test_attention.py::test_deterministic": ["*"],
    "test_attention.py::test_cuda_moderate_shapes": ["*"],
    "test_attention.py::test_cuda_uses_current_stream": ["*"],
    "test_attention.py::test_autocast": ["*"],
    "test_attention.py::test_cuda_backend_head_dims_not_multiple_of_8": ["*"],
    # Varlen attention: plain and causal GQA at head dims 64 and 128, dropout, determinism.
    "test_attention_varlen.py::test_varlen_matches_per_sequence_oracle": [
        "*-plain-*-e64-ev64", "*-causal-gqa-*-e128-ev128", "*-causal-gqa-*-e16-ev24"],
    "test_attention_varlen.py::test_varlen_dropout_is_the_padded_problems": ["*-causal-gqa-*"],
    "test_attention_varlen.py::test_varlen_deterministic": ["*"],
    # LayerNorm: every dtype pair with and without the affine parameters, strided input, the
    # chunked long-row path, realistic sizes, deterministic dweight/dbias, autocast, streams.
    "test_layer_norm.py::test_forward_backward_dtypes": ["*-weight+bias-*", "*-none-*"],
    "test_layer_norm.py::test_cuda_moderate_shapes": ["*"],
    "test_layer_norm.py::test_non_contiguous_and_broadcast_input": ["transposed-*"],
    "test_layer_norm.py::test_long_rows": ["*"],
    "test_layer_norm.py::test_deterministic_param_grads": ["*"],
    "test_layer_norm.py::test_autocast_output_dtype": ["*"],
    "test_layer_norm.py::test_cuda_uses_current_stream": ["*"],
    "test_nn_layer_norm.py::test_module_under_cuda_autocast_output_dtype": ["*"],
    # Fused residual add + dropout + LayerNorm.
    "test_add_layer_norm.py::test_forward_backward": ["w1b1-*"],
    "test_add_layer_norm.py::test_dropout_bits_exact": ["0.1-*"],
    "test_add_layer_norm.py::test_cuda_moderate_shapes": ["*"],
    "test_add_layer_norm.py::test_long_rows_chunked_path": ["*"],
    "test_add_layer_norm.py::test_cuda_autocast_16bit_inputs": ["*"],
    "test_add_layer_norm.py::test_deterministic_param_grads": ["*"],
    # Adam/AdamW: against torch's fused step, clipping and grad scaling in the op, master
    # weights, 16-bit parameters, the sum of squares, many tensors, CUDA graph capture.
    "test_optim.py::test_matches_torch_fused": ["defaults-*", "amsgrad-*", "all-*"],
    "test_optim.py::test_adam_step_op_grad_scale_and_clip": ["*"],
    "test_optim.py::test_max_grad_norm_equals_clip_grad_norm": ["*"],
    "test_optim.py::test_master_weights": ["*"],
    "test_optim.py::test_low_precision_one_step_within_one_ulp": ["*"],
    "test_optim.py::test_grad_scaler": ["*"],
    "test_optim.py::test_sum_of_squares_exact": ["*"],
    "test_optim.py::test_sum_of_squares_random": ["*"],
    "test_optim.py::test_many_tensors": ["*"],
    "test_optim.py::test_odd_and_empty_sizes": ["*"],
    "test_optim.py::test_step_captured_in_cuda_graph": ["*"],
    # Llama-class ops (issue 13): RMSNorm and add+RMSNorm per dtype (and dropout), rotary in
    # both layouts, SwiGLU and both GeGLUs; the attention options (lower-right causal with rows
    # that attend nothing, a window with soft-capping, a lower-right window; dropout; varlen).
    "test_rms_norm.py::test_forward_backward_dtypes": [
        "weight-float32-*", "weight-bfloat16-pbfloat16-*", "none-float16-pfloat32-*"],
    "test_rms_norm.py::test_add_forward_backward": [
        "w1-p0.3-gs1-bfloat16-pbfloat16-*", "w1-p0.3-gs1-float16-pfloat32-*",
        "w1-p0.0-gs0-float32-*"],
    "test_rotary.py::test_forward_backward": ["half-*", "interleaved-torch.bfloat16-*"],
    "test_glu.py::test_forward_backward": [
        "swiglu-*", "geglu-tanh-torch.bfloat16-*", "geglu-erf-torch.float16-*"],
    "test_attention_options.py::test_options_match_oracle": [
        "*-causal-lower-right-L>S-*", "*-softcap-causal-window-*", "*-window-lower-right-L<S-*"],
    "test_attention_options.py::test_options_with_dropout_are_the_reference": ["*"],
    "test_attention_options.py::test_varlen_options_are_each_sequence_alone": ["*"],
    # Modules built from the ops, on CUDA tensors.
    "test_nn_transformer.py::test_layers_match_torch_on_every_backend": ["*"],
    "test_patch.py::test_cuda_model_stays_on_cuda": ["*"],
}

# Kernel family of each test file: the rows of gpu_report.py's pass/fail table.
FAMILIES = {
    "test_attention.py": "attention",
    "test_attention_varlen.py": "varlen_attention",
    "test_attention_options.py": "attention",
    "test_rms_norm.py": "rms_norm",
    "test_rotary.py": "rotary",
    "test_glu.py": "glu",
    "test_layer_norm.py": "layer_norm",
    "test_nn_layer_norm.py": "layer_norm",
    "test_add_layer_norm.py": "add_layer_norm",
    "test_optim.py": "adam",
    "test_nn_transformer.py": "modules",
    "test_nn_multihead_attention.py": "modules",
    "test_patch.py": "modules",
    "test_gpt.py": "modules",
    "test_large_tensors.py": "large_tensors",
}

_DTYPE = re.compile(r"(bfloat16|float16|float32)")


def split_nodeid(nodeid):
    """("file::function", parameter id) of a node id such as
    "tests/test_attention.py::test_forward_backward[cuda-cuda-plain-float32]"."""
    path, _, rest = nodeid.partition("::")
    func, _, pid = rest.partition("[")
    return f"{path.rsplit('/', 1)[-1]}::{func}", pid[:-1] if pid.endswith("]") else pid


def selected_nodeid(nodeid):
    """Whether the `cuda` test `nodeid` belongs to the smoke subset."""
    key, pid = split_nodeid(nodeid)
    return any(fnmatch.fnmatchcase(pid, p) for p in RULES.get(key, ()))


def mark(items):
    """Add the `smoke` marker to the selected `cuda` items (called from conftest.py)."""
    for item in items:
        if "cuda" in item.keywords and selected_nodeid(item.nodeid):
            item.add_marker(pytest.mark.smoke)


def family(ref):
    """Kernel family of a test: `ref` is a node id ("tests/test_attention.py::test_x[...]"), a
    file name, or a junit classname ("tests.test_attention"); "other" when not listed."""
    if "::" in ref or ref.endswith(".py"):
        names = [ref.split("::", 1)[0].rsplit("/", 1)[-1]]
    else:
        names = [part + ".py" for part in ref.split(".")]
    return next((FAMILIES[n] for n in names if n in FAMILIES), "other")


def dtype_of(nodeid):
    """The (input) dtype named in a test's parameter id, or None."""
    m = _DTYPE.search(split_nodeid(nodeid)[1])
    return m.group(1) if m else None


def backend_of(nodeid):
    """The fastlm backend a test's parameter id names first (cuda, triton, torch), or None."""
    return next((t for t in split_nodeid(nodeid)[1].split("-") if t in ("cuda", "triton", "torch")),
                None)
