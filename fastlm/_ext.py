"""Loads the compiled extension fastlm._C, or records why it could not be loaded.

A missing or mismatched _C never makes `import fastlm` fail: the `torch` backend (and `triton`,
where Triton runs) stay usable, and fastlm.backends.available() reports the reason.
"""

import importlib
import importlib.util
import os

import torch

C = None  # the fastlm._C module when loaded
ERROR = None  # why it is not loaded


def _load():
    global C, ERROR
    ext_dir = os.environ.get("FASTLM_EXT_DIR")  # a build made by `fastlm compile --out DIR`
    try:
        if ext_dir:
            import glob

            found = sorted(glob.glob(os.path.join(ext_dir, "fastlm", "_C*.so")))
            if not found:
                ERROR = (f"FASTLM_EXT_DIR={ext_dir} holds no fastlm/_C*.so: build one there with "
                         f"`fastlm compile --arch ... --out DIR`, or unset FASTLM_EXT_DIR")
                return
            spec = importlib.util.spec_from_file_location("fastlm._C", found[0])
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
        else:
            mod = importlib.import_module("fastlm._C")
    except ImportError as e:
        msg = str(e)
        if "No module named" in msg:
            ERROR = ("fastlm._C is not built: run `pip install --no-build-isolation -e .` "
                     "in the fastlm source tree")
        else:
            ERROR = (f"fastlm._C failed to load ({msg.splitlines()[0]}); it was probably built "
                     f"for another torch than {torch.__version__}: rebuild with "
                     "`pip install --no-build-isolation -e .`")
        return
    except OSError as e:
        ERROR = (f"fastlm._C failed to load ({e}); rebuild with "
                 "`pip install --no-build-isolation -e .`")
        return
    built = getattr(mod, "torch_version", "unknown")
    if built != torch.__version__.split("+")[0]:
        ERROR = (f"fastlm._C was built for torch {built} but torch {torch.__version__} is "
                 "installed: rebuild with `pip install --no-build-isolation -e .`")
        return
    C = mod


_load()


def cuda_archs():
    """The sm_XX targets the loaded _C holds CUDA kernels for (empty without CUDA kernels)."""
    if C is None or not C.with_cuda:
        return []
    return [a for a in C.cuda_archs.split(",") if a]
