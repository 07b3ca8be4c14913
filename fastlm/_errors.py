"""Exception types for bad arguments.

torch's ops raise RuntimeError on bad input where Python code would raise ValueError or
TypeError. fastlm's errors are both, so code written for torch (``except RuntimeError``) and
Python-style code (``except ValueError``) both catch them.
"""


class ArgumentError(ValueError, RuntimeError):
    """A bad argument value or shape (a ValueError and a RuntimeError)."""


class ArgumentTypeError(TypeError, RuntimeError):
    """An argument of the wrong type or dtype (a TypeError and a RuntimeError)."""


class UnsupportedDtypeError(ArgumentTypeError, NotImplementedError):
    """A dtype the op has no implementation for, where torch raises NotImplementedError (an
    integer input to layer_norm, say); also a TypeError and a RuntimeError."""
