"""Drop-in torch.optim.Adam and torch.optim.AdamW running fastlm's fused multi-tensor step.

They subclass torch's classes, so the constructor, defaults, argument checks (ValueError with
torch's wording), param groups, add_param_group, zero_grad, hooks, LR schedulers and the
state_dict format (per param: step, exp_avg, exp_avg_sq, max_exp_avg_sq with amsgrad) are
torch's own. Only `step` differs: one fused kernel call per (device, dtype) group.

Extra keyword arguments:
  master_weights=False  keep a float32 copy of float16/bfloat16 params (state "master_param",
                        saved in the state_dict) and float32 moments; the params are the
                        rounding of the masters.
  max_grad_norm=None    clip by the global L2 norm of all gradients, as
                        torch.nn.utils.clip_grad_norm_(params, max_grad_norm) would, inside the
                        step (no host synchronization); the norm (of the unscaled gradients) is
                        `optimizer.grad_norm` afterwards, a tensor.
`fused`, `foreach` and `capturable` are accepted for compatibility: the step is always fused
and never reads device values on the host.

What the kernels do not take runs elsewhere, with torch's result (said once on the "fastlm"
logger, fastlm/_log.py):
  complex params      updated as their real views (torch's rule), on the kernels; the state
                      is complex, as torch's.
  non-contiguous      a dense param in another dim order (a transpose, channels_last) runs on
                      the kernels in its memory order, its state laid out like it (as torch's
                      zeros_like); a param with gaps or overlaps is copied in and out.
  float64             torch's own fused Adam kernel (float64 arithmetic; the kernels compute
                      in float32); the reference under fastlm.use_backend("torch").
  differentiable=True torch.optim's step (torch's differentiable implementation, for every
                      group); master_weights and max_grad_norm are then rejected.
copy.deepcopy and pickle keep master_weights, max_grad_norm and grad_norm.

load_state_dict keeps float32 what fastlm keeps float32: torch's Optimizer.load_state_dict casts
every floating state tensor to its param's dtype (in
Optimizer._process_value_according_to_param_policy, which it calls through the base class, so a
subclass cannot override it), which would round master_param and the float32 moments of
master_weights params to float16/bfloat16. Those entries are set
aside before torch's cast and put back afterwards, on the param's device. A checkpoint of
torch.optim (moments in the param's dtype, no master_param) loads as it is; with master_weights
its moments are widened to float32 (exactly) and the master is the param, on the next step.

DTensor parameters (FSDP2's fully_shard, tensor parallelism): the state is created like torch's
(zeros_like(param), so DTensors with the param's placements) and the state_dict is torch's. The
fused step runs on the local shards (param, grad and state share their placements: the update
is elementwise). With max_grad_norm, each rank's local sum of squares is all-reduced (SUM) over
the mesh dimensions on which the gradient is sharded (Shard, _StridedShard) and not over
Replicate ones, so the norm is the global one, on every rank; `optimizer.grad_norm` is then a
plain tensor, equal to the full norm torch.nn.utils.clip_grad_norm_ returns. Other placements
(Partial) raise.
"""

import sys

import torch

from .. import backends
from .._log import log_once
from ..ops.adam import KERNEL_DTYPES, adam_step_, reference_sum_of_squares, sum_of_squares


def _check_extras(differentiable, max_grad_norm, master_weights):
    if max_grad_norm is not None and not (float(max_grad_norm) > 0.0):
        raise ValueError(f"Invalid max_grad_norm value: {max_grad_norm}")
    if differentiable and (master_weights or max_grad_norm is not None):
        raise ValueError("fastlm.optim: differentiable=True runs torch.optim's step, which has "
                         "no master_weights or max_grad_norm; drop those (clip with "
                         "torch.nn.utils.clip_grad_norm_)")


def _torch_step(cls):
    """torch's `step` of `cls` without the hook wrapper that Optimizer._patch_step_function
    puts on a class whose instance was made (fastlm's own step already runs the hooks)."""
    f = cls.step
    while getattr(f, "hooked", False):
        f = f.__wrapped__
    return f


def _dense_perm(t):
    """The dim order in which `t` is contiguous (identity for a contiguous t), or None when no
    order is (a view with gaps or overlapping elements)."""
    if t.is_contiguous():
        return tuple(range(t.dim()))
    perm = tuple(sorted(range(t.dim()), key=lambda d: -t.stride(d)))
    return perm if t.permute(perm).is_contiguous() else None


def _laid_out_like(t, p):
    """Whether state tensor t has the layout zeros_like(p) gives: p's strides when p is dense,
    else contiguous."""
    if p.is_contiguous():
        return t.is_contiguous()
    perm = _dense_perm(p)
    if perm is None or t.shape != p.shape:
        return t.is_contiguous()
    return t.permute(perm).is_contiguous()


def _real(t):
    return torch.view_as_real(t) if t.is_complex() else t


_LOW = (torch.float16, torch.bfloat16)
_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def _dtensor_type():
    """DTensor's class if torch.distributed.tensor is loaded (no DTensor exists otherwise; the
    import takes a second, so fastlm does not do it)."""
    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None)


def _is_shard(placement):
    # _StridedShard (FSDP2 over tensor parallelism) is a Shard subclass in some torch versions
    # and not in others; either way each element lives on one rank of that mesh dimension.
    return placement.is_shard() or type(placement).__name__ == "_StridedShard"


def _local_param_grad(opt_name, p, grad, dtensor):
    """(local param, local grad, norm reduction) of a DTensor param: the reduction is None or
    (mesh, mesh dims to all-reduce a local sum of squares over)."""
    if not (isinstance(p, dtensor) and isinstance(grad, dtensor)):
        raise RuntimeError(f"{opt_name} (fastlm): a param and its grad must both be DTensors or "
                           f"neither (got {type(p).__name__} and {type(grad).__name__})")
    mesh, placements = p.device_mesh, tuple(p.placements)
    for pl in placements + tuple(grad.placements):
        if not (_is_shard(pl) or pl.is_replicate()):
            raise RuntimeError(f"{opt_name} (fastlm): DTensor placement {pl!r} is not supported "
                               "(only Shard and Replicate)")
    if grad.device_mesh != mesh or tuple(grad.placements) != placements:
        raise RuntimeError(f"{opt_name} (fastlm): a DTensor grad must have its param's mesh and "
                           f"placements (param {placements}, grad {tuple(grad.placements)})")
    dims = tuple(d for d, pl in enumerate(placements) if _is_shard(pl))
    return p.to_local(), grad.to_local(), ((mesh, dims) if dims else None)


class _FusedAdam:
    """The fused step shared by Adam and AdamW."""

    _decoupled_default = False

    def _fastlm_setup(self, max_grad_norm):
        self.defaults["master_weights"] = self._master_default
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.grad_norm = None
        # GradScaler then hands the step `grad_scale` and `found_inf` (as tensors) instead of
        # unscaling the gradients itself.
        self._step_supports_amp_scaling = True

    def add_param_group(self, param_group):
        param_group.setdefault("master_weights", self._master_default)
        super().add_param_group(param_group)

    # What torch's Optimizer.__getstate__ leaves out and fastlm's step needs.
    _EXTRAS = {"_master_default": False, "max_grad_norm": None, "grad_norm": None}

    def __getstate__(self):
        """torch's state (defaults, state, param_groups) and fastlm's settings, so that
        copy.deepcopy, pickle and torch.save of the optimizer keep them."""
        state = super().__getstate__()
        state.update({k: self.__dict__.get(k, v) for k, v in self._EXTRAS.items()})
        return state

    def __setstate__(self, state):
        # torch's load_state_dict calls this too, with only state and param_groups: settings
        # absent from `state` keep their values (or take the defaults, from an old pickle).
        super().__setstate__(state)
        for k, v in self._EXTRAS.items():
            self.__dict__.setdefault(k, v)
        self._step_supports_amp_scaling = True
        # A torch.optim checkpoint has no master_weights: the constructor's choice holds.
        for group in self.param_groups:
            group.setdefault("master_weights", self._master_default)

    def load_state_dict(self, state_dict):
        """torch's load_state_dict, keeping master_param and the float32 moments of
        master_weights params in float32 (torch would cast them to the param's dtype)."""
        kept = []  # (param, key, float32 tensor)

        def keep_float32(opt, sd):
            # Runs after every other pre-hook (registered last), on the dict torch will load.
            saved = sd["param_groups"]
            if len(saved) != len(self.param_groups):
                return None  # torch raises its own error
            for g_saved, g in zip(saved, self.param_groups):
                master = g_saved.get("master_weights", self._master_default)
                if len(g_saved["params"]) != len(g["params"]):
                    return None
                for pid, p in zip(g_saved["params"], g["params"]):
                    st = sd["state"].get(pid)
                    if not st or p.dtype not in _LOW:
                        continue
                    for key in ("master_param",) + (_MOMENTS if master else ()):
                        v = st.get(key)
                        if isinstance(v, torch.Tensor) and v.dtype == torch.float32:
                            kept.append((p, key, v))
            return None

        handle = self.register_load_state_dict_pre_hook(keep_float32)
        try:
            super().load_state_dict(state_dict)
        finally:
            handle.remove()
        for p, key, v in kept:
            self.state[p][key] = v.to(device=p.device)

    def _state_for(self, p, group, dtensor):
        """p's state, created as torch's (moments zeros_like(p): p's layout; complex for a
        complex p) plus fastlm's master_param; a loaded state is brought to that form (step
        a float32 tensor on p's device, moments laid out like p, float32 with masters)."""
        state = self.state[p]
        master = group.get("master_weights", self._master_default) and p.dtype in _LOW
        keys = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group["amsgrad"] else ())
        if len(state) == 0:
            moment = torch.float32 if master else p.dtype
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            for key in keys:
                state[key] = torch.zeros_like(p, dtype=moment,
                                              memory_format=torch.preserve_format)
            if master:
                state["master_param"] = p.detach().to(torch.float32, copy=True)
            return state
        # A state loaded from torch.optim keeps step on the CPU: move it once.
        if state["step"].device != p.device or state["step"].dtype != torch.float32:
            state["step"] = state["step"].to(device=p.device, dtype=torch.float32)
        if group["amsgrad"] and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(state["exp_avg_sq"])
        if master:
            if "master_param" not in state:
                state["master_param"] = p.detach().to(torch.float32, copy=True)
            # Moments loaded from torch.optim are in the param's dtype: widen them (exact).
            for key in _MOMENTS:
                if key in state and state[key].dtype != torch.float32:
                    state[key] = state[key].to(torch.float32)
        if not (dtensor is not None and isinstance(p, dtensor)):
            # Loaded or moved tensors may be laid out otherwise: once, as zeros_like(p) would.
            for key in _MOMENTS + ("master_param",):
                t = state.get(key)
                if t is not None and not _laid_out_like(t, p):
                    state[key] = torch.empty_like(p, dtype=t.dtype).copy_(t)
        return state

    def _collect(self):
        """{(device, dtype, moment dtype, group index): lists} of the params that have a grad,
        as the kernels take them: DTensors replaced by their local shards, complex tensors by
        their real views, dense non-contiguous ones permuted to their memory order, others
        copied ("writeback": (tensor, contiguous copy) pairs to copy back after the step).
        "reduce" holds, per grad, how its sum of squares is all-reduced (None: not at all)."""
        name = type(self).__name__
        dtensor = _dtensor_type()
        buckets = {}
        for gi, group in enumerate(self.param_groups):
            master_on = group.get("master_weights", self._master_default)
            for p in group["params"]:
                grad = p.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError(f"{name} (fastlm) does not support sparse gradients, "
                                       "please consider torch.optim.SparseAdam")
                param, reduce = p, None
                sharded = dtensor is not None and (isinstance(p, dtensor)
                                                   or isinstance(grad, dtensor))
                if sharded:
                    p, grad, reduce = _local_param_grad(name, p, grad, dtensor)
                local = state = self._state_for(param, group, dtensor)
                if sharded:
                    local = {k: v.to_local() if isinstance(v, dtensor) else v
                             for k, v in state.items()}
                p, grad = _real(p), _real(grad)
                perm = _dense_perm(p)
                if perm is None:
                    log_once("optim-copy", f"fastlm.optim.{name}: a parameter with gaps or "
                             "overlapping elements (not dense) is updated through a "
                             "contiguous copy (copy-in/copy-out)")
                identity = perm is None or perm == tuple(range(p.dim()))
                b = buckets.setdefault((p.device, p.dtype, _real(local["exp_avg"]).dtype, gi),
                                       {"params": [], "grads": [], "exp_avgs": [],
                                        "exp_avg_sqs": [], "max_exp_avg_sqs": [], "masters": [],
                                        "steps": [], "reduce": [], "writeback": []})

                def kernel_view(t, b=b, perm=perm, identity=identity):
                    # t in memory order, contiguous; a copy (written back) if it cannot be.
                    t = _real(t)
                    v = t if identity else t.permute(perm)
                    if v.is_contiguous():
                        return v
                    c = v.contiguous()
                    b["writeback"].append((v, c))
                    return c

                b["params"].append(kernel_view(p))
                b["grads"].append((grad if identity else grad.permute(perm)).contiguous())
                b["reduce"].append(reduce)
                b["exp_avgs"].append(kernel_view(local["exp_avg"]))
                b["exp_avg_sqs"].append(kernel_view(local["exp_avg_sq"]))
                if group["amsgrad"]:
                    b["max_exp_avg_sqs"].append(kernel_view(local["max_exp_avg_sq"]))
                if "master_param" in local and master_on:
                    b["masters"].append(kernel_view(local["master_param"]))
                b["steps"].append(local["step"])
        return buckets

    def _clip_coef(self, buckets, grad_scale):
        """Global gradient norm (of the unscaled grads) and the clip coefficient, as device
        tensors. Sums of squares per (device, reduction, kernel dtype or not); those of sharded
        DTensor grads are all-reduced over their mesh dimensions; the sums are added on the
        first device."""
        groups = {}
        for (dev, dtype, _, _), b in buckets.items():
            for g, reduce in zip(b["grads"], b["reduce"]):
                groups.setdefault((dev, reduce, dtype in KERNEL_DTYPES), []).append(g)
        if not groups:
            return None
        sums = []
        for (_, reduce, kernel), gs in groups.items():
            # float64 grads: the reference (float64 sums), whatever backend is forced.
            s = sum_of_squares(gs) if kernel else reference_sum_of_squares(gs)
            if reduce is not None:
                import torch.distributed as dist

                mesh, dims = reduce
                for d in dims:
                    dist.all_reduce(s, op=dist.ReduceOp.SUM, group=mesh.get_group(d))
            sums.append(s)
        home = sums[0].device
        total = sums[0]
        for s in sums[1:]:
            total = total + s.to(home, non_blocking=True)
        norm = total.sqrt()
        if grad_scale is not None:
            norm = norm / grad_scale.to(home, non_blocking=True)
        self.grad_norm = norm
        return torch.clamp(self.max_grad_norm / (norm + 1e-6), max=1.0)

    def step(self, closure=None):
        """One fused step over every param with a grad; returns closure's loss if given.
        With differentiable=True (in any group): torch.optim's step, as torch runs it."""
        if any(group.get("differentiable", False) for group in self.param_groups):
            log_once("optim-differentiable", f"fastlm.optim.{type(self).__name__}: "
                     "differentiable=True runs torch.optim's step")
            return _torch_step(self._torch_class)(self, closure)
        return self._fused_step(closure)

    @torch.no_grad()
    def _fused_step(self, closure):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        buckets = self._collect()
        clip = self._clip_coef(buckets, grad_scale) if self.max_grad_norm is not None else None
        for (dev, dtype, _, gi), b in buckets.items():
            group = self.param_groups[gi]
            beta1, beta2 = (float(x) for x in group["betas"])
            torch._foreach_add_(b["steps"], 1)
            inf = None if found_inf is None else found_inf.to(dev, non_blocking=True)
            args = dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                        weight_decay=group["weight_decay"],
                        decoupled=group.get("decoupled_weight_decay", self._decoupled_default),
                        amsgrad=group["amsgrad"], maximize=group["maximize"],
                        grad_scale=grad_scale, found_inf=inf,
                        clip_coef=None if clip is None else clip.to(dev, non_blocking=True))
            if dtype not in KERNEL_DTYPES and backends.forced() != "torch":
                _torch_fused_step(type(self).__name__, b, **args)
            else:
                adam_step_(b["params"], b["grads"], b["exp_avgs"], b["exp_avg_sqs"],
                           b["max_exp_avg_sqs"], b["masters"], b["steps"], **args)
            for dst, src in b["writeback"]:
                dst.copy_(src)
            if inf is not None:  # a skipped step does not count (as torch's fused Adam)
                torch._foreach_sub_(b["steps"], [inf] * len(b["steps"]))
        return loss


def _torch_fused_step(name, b, *, lr, beta1, beta2, eps, weight_decay, decoupled, amsgrad,
                      maximize, grad_scale, found_inf, clip_coef):
    """The step of a bucket the kernels do not take (float64, complex128 as its float64 view):
    torch's own fused Adam/AdamW kernel on CPU and CUDA tensors (float64 arithmetic), else the
    reference (also float64). Clipping is folded into torch's grad_scale, which that kernel
    divides the grads by in place: then it gets copies."""
    dev = b["params"][0].device
    if dev.type not in ("cpu", "cuda"):
        log_once(f"optim-reference-{b['params'][0].dtype}-{dev.type}",
                 f"fastlm.optim.{name}: {b['params'][0].dtype} parameters on {dev.type} run "
                 "on the reference step (float64 arithmetic)")
        with backends.use_backend("torch"):
            adam_step_(b["params"], b["grads"], b["exp_avgs"], b["exp_avg_sqs"],
                       b["max_exp_avg_sqs"], [], b["steps"], lr=lr, beta1=beta1, beta2=beta2,
                       eps=eps, weight_decay=weight_decay, decoupled=decoupled, amsgrad=amsgrad,
                       maximize=maximize, grad_scale=grad_scale, found_inf=found_inf,
                       clip_coef=clip_coef)
        return
    log_once(f"optim-torch-fused-{b['params'][0].dtype}",
             f"fastlm.optim.{name}: {b['params'][0].dtype} parameters run on torch's fused "
             "Adam kernel (fastlm's kernels compute in float32)")
    f32 = torch.float32
    scale = None if grad_scale is None else grad_scale.to(device=dev, dtype=f32).reshape(())
    if clip_coef is not None:
        clip_coef = clip_coef.to(device=dev, dtype=f32).reshape(())
        scale = 1.0 / clip_coef if scale is None else scale / clip_coef
    grads = b["grads"] if scale is None else [g.clone() for g in b["grads"]]
    if isinstance(lr, torch.Tensor):
        lr = lr.to(device=dev, dtype=f32).reshape(())
    fn = torch._fused_adamw_ if decoupled else torch._fused_adam_
    fn(b["params"], grads, b["exp_avgs"], b["exp_avg_sqs"], b["max_exp_avg_sqs"], b["steps"],
       lr=lr, beta1=beta1, beta2=beta2, weight_decay=float(weight_decay), eps=float(eps),
       amsgrad=bool(amsgrad), maximize=bool(maximize), grad_scale=scale,
       found_inf=None if found_inf is None else found_inf.to(device=dev, dtype=f32))


class Adam(_FusedAdam, torch.optim.Adam):
    _torch_class = torch.optim.Adam

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 amsgrad=False, *, foreach=None, maximize=False, capturable=False,
                 differentiable=False, fused=None, decoupled_weight_decay=False,
                 master_weights=False, max_grad_norm=None):
        _check_extras(differentiable, max_grad_norm, master_weights)
        self._master_default = bool(master_weights)  # read by add_param_group during __init__
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, foreach=foreach, maximize=maximize,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=decoupled_weight_decay)
        self._fastlm_setup(max_grad_norm)


class AdamW(_FusedAdam, torch.optim.AdamW):
    _decoupled_default = True
    _torch_class = torch.optim.AdamW

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, *, maximize=False, foreach=None, capturable=False,
                 differentiable=False, fused=None, master_weights=False, max_grad_norm=None):
        _check_extras(differentiable, max_grad_norm, master_weights)
        self._master_default = bool(master_weights)  # read by add_param_group during __init__
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, maximize=maximize, foreach=foreach,
                         capturable=capturable, differentiable=differentiable, fused=fused)
        self._fastlm_setup(max_grad_norm)
