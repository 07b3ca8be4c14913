"""The Python faces of fastlm's ops: reference, fake kernels, autograd, backend choice."""
