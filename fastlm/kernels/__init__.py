"""fastlm's Triton kernels and their launch functions (installed as fastlm.kernels)."""
