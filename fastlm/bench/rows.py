"""What the row-wise cases (layer_norm, add_layer_norm) share: their (M rows, N) shapes, seeded
inputs and the size of one (M, N) tensor."""

import torch


def _shapes(m, ns, dtype):
    return [{"M": m, "N": n, "dtype": dtype} for n in ns]


def row_shapes():
    """The shapes per device, full and quick."""
    return {
        "cuda": {"full": _shapes(32768, (768, 1024, 2048, 4096, 8192), "bfloat16"),
                 "quick": _shapes(8192, (1024, 4096), "bfloat16")},
        "cpu": {"full": _shapes(4096, (768, 1024, 2048, 4096), "float32"),
                "quick": _shapes(4096, (1024,), "float32")},
    }


def seeded_randn(shape, device):
    """randn(*size, scale=1, shift=0): normals drawn in float32 from a generator seeded with 0,
    returned in the shape's dtype (successive calls draw successive values)."""
    dtype = getattr(torch, shape["dtype"])
    g = torch.Generator(device=device).manual_seed(0)

    def randn(*size, scale=1.0, shift=0.0):
        t = torch.randn(*size, generator=g, device=device, dtype=torch.float32)
        return (t * scale + shift).to(dtype)

    return randn


def matrix_bytes(shape):
    """Bytes of one (M, N) tensor of the shape's dtype."""
    size = torch.empty((), dtype=getattr(torch, shape["dtype"])).element_size()
    return shape["M"] * shape["N"] * size
