"""What every op module (fastlm/ops/<op>.py) registers the same way: autograd for a
forward/backward op pair, and its Triton custom ops, defined lazily on first use."""

import torch


def register_autograd(who, fwd_name, bwd_name, backward, setup_context):
    """Autograd of the op pair: `backward` (which calls the backward op) for the forward op; the
    backward op itself refuses double backward, naming `who` (the public function)."""

    def no_double_backward(ctx, *grads):
        raise RuntimeError(
            f"{who} does not support double backward (higher-order gradients): run that "
            "computation with fastlm.use_backend('torch')")

    torch.library.register_autograd(fwd_name, backward, setup_context=setup_context)
    torch.library.register_autograd(bwd_name, no_double_backward,
                                    setup_context=lambda ctx, inputs, output: None)


def lazy_triton_ops(register):
    """triton_ops_ready for an op module: the function that defines its Triton custom ops
    (`register`, run once, on the first call) and returns True.

    Deferred because torch.library.triton_op imports torch._inductor, which would add about a
    second to `import fastlm`. torch.compile runs triton_ops_ready at trace time instead of
    tracing the registration: it is marked as torch.compiler.assume_constant_result marks a
    function, without importing torch._dynamo (another second) when fastlm is imported."""
    done = False

    def triton_ops_ready() -> bool:
        nonlocal done
        if not done:
            register()
            done = True
        return True

    triton_ops_ready._dynamo_marked_constant = True
    return triton_ops_ready
