"""Lets fastlm run from its source tree before `pip install -e .` has finished: on PYTHONPATH
(with the repository root), `fastlm.kernels` resolves to kernels/, as setup.py's package_dir
maps it in an install. scripts/gpu_run.sh uses it for the Triton warm-up that runs while nvcc
builds the extension; nothing else needs it."""

import importlib.abc
import importlib.util
import os
import sys

_KERNELS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "kernels")


class _KernelsFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "fastlm.kernels":
            return None  # submodules are found through the package's __path__
        return importlib.util.spec_from_file_location(
            name, os.path.join(_KERNELS, "__init__.py"), submodule_search_locations=[_KERNELS])


sys.meta_path.append(_KernelsFinder())  # after the normal finders: an install wins
