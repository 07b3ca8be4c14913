"""Driver for compute-sanitizer (stage `sanitize` of scripts/gpu_run.sh): runs every CUDA
kernel of fastlm once, forward and backward, on small shapes that reach each of its code paths
(dtypes, head dims, masks, causal, GQA, dropout, varlen, odd and vector-unaligned sizes, the
chunked LayerNorm path, Adam's clipping, master weights, AMSGrad and chunk boundaries).

    compute-sanitizer --tool memcheck --error-exitcode 3 \
        env PYTORCH_NO_CUDA_MEMORY_CACHING=1 python3 scripts/gpu_sanitize.py
    python3 scripts/gpu_sanitize.py --device cpu        # the dry run: the CPU kernels instead

PYTORCH_NO_CUDA_MEMORY_CACHING=1 gives each tensor its own cudaMalloc, so memcheck sees an
access past a tensor's end instead of landing in the caching allocator's slack. Each case's
results are checked against the torch backend loosely (finite, and close at bf16-level
tolerance): the tests own exactness; here a garbage result points at the case that made it.
Exit status 1 when any case raised or disagreed.
"""

import argparse
import os
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = ("float32", "float16", "bfloat16")


def _close(got, want, what):
    import torch

    for g, w in zip(got, want):
        if g is None and w is None:
            continue
        assert g is not None and w is not None, f"{what}: gradient presence differs"
        g, w = g.double(), w.double()
        assert torch.isfinite(g).all() or not torch.isfinite(w).all(), f"{what}: non-finite"
        tol = 0.05 + 0.05 * w.abs().max().item() if w.numel() else 0
        err = (g - w).abs().max().item() if w.numel() else 0.0
        assert err <= tol, f"{what}: max error {err:.3g} against the torch backend (tol {tol:.3g})"


def _grads(fn, leaves, dout_seed=7):
    """Forward with `fn`, backward with a seeded upstream gradient; (outputs..., grads...)."""
    import torch

    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in leaves]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    g = torch.Generator(device="cpu").manual_seed(dout_seed)
    douts = [torch.randn(o.shape, generator=g).to(o) for o in outs]
    need = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(outs, need, douts, allow_unused=True)
    it = iter(grads)
    return [o.detach() for o in outs] + [next(it) if t is not None else None for t in leaves]


def compare(backend, ref_backend, fn, leaves, what):
    import fastlm

    with fastlm.use_backend(backend):
        got = _grads(fn, leaves)
    with fastlm.use_backend(ref_backend):
        want = _grads(fn, leaves)
    _close(got, want, what)


def layer_norm_cases(dev, dtypes=DTYPES):
    import torch

    import fastlm

    g = torch.Generator(device="cpu").manual_seed(0)
    for dt in dtypes:
        for m, n in ((3, 1), (5, 7), (4, 64), (3, 1000), (2, 4099), (2, 8192), (2, 70000)):
            x = (torch.randn(m, n, generator=g) * 2 + 1).to(dev, getattr(torch, dt))
            for pdt in {dt, "float32"}:
                w = (1 + 0.5 * torch.randn(n, generator=g)).to(dev, getattr(torch, pdt))
                b = (0.5 * torch.randn(n, generator=g)).to(dev, getattr(torch, pdt))
                yield (f"layer_norm {dt} params {pdt} ({m}, {n})",
                       lambda x, w, b, n=n: fastlm.layer_norm(x, (n,), w, b), [x, w, b])
            yield (f"layer_norm {dt} no affine ({m}, {n})",
                   lambda x, n=n: fastlm.layer_norm(x, (n,)), [x])
        for p in (0.0, 0.1):
            x = torch.randn(6, 1000, generator=g).to(dev, getattr(torch, dt))
            r = torch.randn(6, 1000, generator=g).to(dev, getattr(torch, dt))
            w = torch.ones(1000, device=dev, dtype=getattr(torch, dt))
            b = torch.zeros(1000, device=dev, dtype=getattr(torch, dt))
            yield (f"add_layer_norm {dt} p={p} (6, 1000)",
                   lambda x, r, w, b, p=p: _seeded(lambda: fastlm.add_layer_norm(
                       x, r, (1000,), w, b, dropout_p=p)), [x, r, w, b])


def attention_cases(dev, dtypes=DTYPES):
    import torch

    import fastlm

    g = torch.Generator(device="cpu").manual_seed(1)

    def rnd(*shape, dt):
        return torch.randn(*shape, generator=g).to(dev, getattr(torch, dt))

    for dt in dtypes:
        for d in (64, 128, 256, 40):
            for causal in (False, True):
                q, k, v = rnd(2, 2, 37, d, dt=dt), rnd(2, 2, 53, d, dt=dt), rnd(2, 2, 53, d, dt=dt)
                yield (f"attention {dt} D{d} causal={causal} L37 S53",
                       lambda q, k, v, c=causal: fastlm.scaled_dot_product_attention(
                           q, k, v, is_causal=c), [q, k, v])
        q, k, v = rnd(1, 4, 33, 64, dt=dt), rnd(1, 2, 41, 64, dt=dt), rnd(1, 2, 41, 64, dt=dt)
        yield (f"attention {dt} GQA 4/2 causal",
               lambda q, k, v: fastlm.scaled_dot_product_attention(
                   q, k, v, is_causal=True, enable_gqa=True), [q, k, v])
        mb = torch.rand(33, 41, generator=g).to(dev) > 0.3
        mf = rnd(1, 1, 33, 41, dt=dt)
        q, k, v = rnd(1, 2, 33, 64, dt=dt), rnd(1, 2, 41, 64, dt=dt), rnd(1, 2, 41, 64, dt=dt)
        for name, mask in (("bool", mb), ("float", mf)):
            yield (f"attention {dt} {name} mask",
                   lambda q, k, v, m=mask: fastlm.scaled_dot_product_attention(
                       q, k, v, attn_mask=m), [q, k, v])
        yield (f"attention {dt} dropout 0.2",
               lambda q, k, v: _seeded(lambda: fastlm.scaled_dot_product_attention(
                   q, k, v, dropout_p=0.2)), [q, k, v])
        cu = torch.tensor([0, 17, 17, 50], dtype=torch.int32, device=dev)
        q, k, v = rnd(50, 4, 64, dt=dt), rnd(50, 2, 64, dt=dt), rnd(50, 2, 64, dt=dt)
        yield (f"varlen_attention {dt} 3 sequences GQA causal",
               lambda q, k, v: fastlm.varlen_attention(q, k, v, cu, cu, 33, 33, is_causal=True,
                                                       enable_gqa=True), [q, k, v])


def _seeded(fn):
    """fn() with torch's generators seeded: dropout draws the same Philox bits on every
    backend (docs/attention.md, docs/layer_norm.md), so each result compares with torch's."""
    import torch

    torch.manual_seed(1234)
    return fn()


def adam_cases(dev, dtypes=DTYPES):
    for pdt in dtypes:
        for clip in (None, 1.0):
            for master in ((False, True) if pdt != "float32" else (False,)):
                for amsgrad in (False, True):
                    name = (f"AdamW {pdt} clip={clip} master={master} amsgrad={amsgrad} "
                            "sizes 1, 1000, 65537")
                    yield name, (pdt, clip, master, amsgrad)


def run_adam(backend, dev, pdt, clip, master, amsgrad):
    import torch

    import fastlm

    g = torch.Generator(device="cpu").manual_seed(2)
    params = [torch.randn(n, generator=g).to(dev, getattr(torch, pdt)).requires_grad_()
              for n in (1, 1000, 65537)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(p)
    with fastlm.use_backend(backend):
        opt = fastlm.optim.AdamW(params, lr=1e-2, amsgrad=amsgrad, master_weights=master,
                                 max_grad_norm=clip)
        opt.step()
        opt.step()
    return [p.detach() for p in params]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--backend", default=None,
                   help="fastlm backend to check (default: cuda on cuda, cpu on cpu)")
    p.add_argument("--dtypes", default=",".join(DTYPES),
                   help=f"comma-separated dtypes (default {','.join(DTYPES)})")
    p.add_argument("--only", default=None,
                   help="comma-separated families: layer_norm, attention, adam (default all)")
    a = p.parse_args(argv)
    sys.path.insert(0, ROOT)
    import torch

    dev = torch.device(a.device)
    backend = a.backend or ("cuda" if a.device == "cuda" else "cpu")
    only = set(a.only.split(",")) if a.only else {"layer_norm", "attention", "adam"}
    failed, n, t_all = [], 0, time.time()

    def report(name, fn):
        nonlocal n
        n += 1
        t0 = time.time()
        try:
            fn()
            print(f"ok    {name} ({time.time() - t0:.1f} s)", flush=True)
        except Exception as e:
            failed.append(name)
            print(f"FAIL  {name}: {type(e).__name__}: {e}", flush=True)
            traceback.print_exc()

    dtypes = [d for d in a.dtypes.split(",") if d]
    if not dtypes or any(d not in DTYPES for d in dtypes):
        p.error(f"--dtypes: choose from {', '.join(DTYPES)}, got {a.dtypes!r}")
    cases = []
    if "layer_norm" in only:
        cases += list(layer_norm_cases(dev, dtypes))
    if "attention" in only:
        cases += list(attention_cases(dev, dtypes))
    for name, fn, leaves in cases:
        report(name, lambda fn=fn, leaves=leaves, name=name:
               compare(backend, "torch", fn, leaves, name))
    if "adam" in only:
        for name, args in adam_cases(dev, dtypes):
            report(name, lambda args=args, name=name: _close(
                run_adam(backend, dev, *args), run_adam("torch", dev, *args), name))
    if dev.type == "cuda":
        torch.cuda.synchronize()
    print(f"{n - len(failed)}/{n} cases ok on the {backend} backend ({a.device}) in "
          f"{time.time() - t_all:.1f} s", flush=True)
    if failed:
        print("failed: " + "; ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
