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
and never reads device values on the host. `differentiable=True` is not supported.

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

from ..ops.adam import adam_step_, sum_of_squares


def _check_extras(differentiable, max_grad_norm):
    if differentiable:
        raise ValueError("fastlm.optim: differentiable=True is not supported (use torch.optim)")
    if max_grad_norm is not None and not (float(max_grad_norm) > 0.0):
        raise ValueError(f"Invalid max_grad_norm value: {max_grad_norm}")


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

    def __setstate__(self, state):
        super().__setstate__(state)
        # A torch.optim checkpoint has no master_weights: the constructor's choice holds.
        for group in self.param_groups:
            group.setdefault("master_weights", self.__dict__.get("_master_default", False))

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

    def _state_for(self, p, group):
        state = self.state[p]
        master = group.get("master_weights", self._master_default) and p.dtype in _LOW
        if len(state) == 0:
            moment = torch.float32 if master else p.dtype
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, dtype=moment,
                                                memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=moment,
                                                   memory_format=torch.contiguous_format)
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = torch.zeros_like(p, dtype=moment,
                                                           memory_format=torch.contiguous_format)
            if master:
                state["master_param"] = p.detach().to(torch.float32, copy=True)
        else:
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
            for key in _MOMENTS:
                if key in state and not state[key].is_contiguous():
                    state[key] = state[key].contiguous()
        return state

    def _collect(self):
        """{(device, dtype, moment dtype, group index): lists} of the params that have a grad;
        DTensors are replaced by their local shards. "reduce" holds, per grad, how its sum of
        squares is all-reduced (None: not at all)."""
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
                if not p.is_contiguous():
                    raise RuntimeError(f"{name} (fastlm): parameters must be contiguous")
                local = state = self._state_for(param, group)
                if sharded:
                    local = {k: v.to_local() if isinstance(v, dtensor) else v
                             for k, v in state.items()}
                b = buckets.setdefault((p.device, p.dtype, local["exp_avg"].dtype, gi),
                                       {"params": [], "grads": [], "exp_avgs": [],
                                        "exp_avg_sqs": [], "max_exp_avg_sqs": [], "masters": [],
                                        "steps": [], "reduce": []})
                b["params"].append(p)
                b["grads"].append(grad.contiguous())
                b["reduce"].append(reduce)
                b["exp_avgs"].append(local["exp_avg"])
                b["exp_avg_sqs"].append(local["exp_avg_sq"])
                if group["amsgrad"]:
                    b["max_exp_avg_sqs"].append(local["max_exp_avg_sq"])
                if "master_param" in local and master_on:
                    b["masters"].append(local["master_param"])
                b["steps"].append(local["step"])
        return buckets

    def _clip_coef(self, buckets, grad_scale):
        """Global gradient norm (of the unscaled grads) and the clip coefficient, as device
        tensors. Sums of squares per (device, reduction); those of sharded DTensor grads are
        all-reduced over their mesh dimensions; the sums are added on the first device."""
        groups = {}
        for (dev, _, _, _), b in buckets.items():
            for g, reduce in zip(b["grads"], b["reduce"]):
                groups.setdefault((dev, reduce), []).append(g)
        if not groups:
            return None
        sums = []
        for (_, reduce), gs in groups.items():
            s = sum_of_squares(gs)
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

    @torch.no_grad()
    def step(self, closure=None):
        """One fused step over every param with a grad; returns closure's loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        buckets = self._collect()
        clip = self._clip_coef(buckets, grad_scale) if self.max_grad_norm is not None else None
        for (dev, _, _, gi), b in buckets.items():
            group = self.param_groups[gi]
            beta1, beta2 = (float(x) for x in group["betas"])
            lr = group["lr"]
            torch._foreach_add_(b["steps"], 1)
            inf = None if found_inf is None else found_inf.to(dev, non_blocking=True)
            adam_step_(
                b["params"], b["grads"], b["exp_avgs"], b["exp_avg_sqs"], b["max_exp_avg_sqs"],
                b["masters"], b["steps"], lr=lr, beta1=beta1, beta2=beta2, eps=group["eps"],
                weight_decay=group["weight_decay"],
                decoupled=group.get("decoupled_weight_decay", self._decoupled_default),
                amsgrad=group["amsgrad"], maximize=group["maximize"],
                grad_scale=grad_scale, found_inf=inf,
                clip_coef=None if clip is None else clip.to(dev, non_blocking=True))
            if inf is not None:  # a skipped step does not count (as torch's fused Adam)
                torch._foreach_sub_(b["steps"], [inf] * len(b["steps"]))
        return loss


class Adam(_FusedAdam, torch.optim.Adam):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 amsgrad=False, *, foreach=None, maximize=False, capturable=False,
                 differentiable=False, fused=None, decoupled_weight_decay=False,
                 master_weights=False, max_grad_norm=None):
        _check_extras(differentiable, max_grad_norm)
        self._master_default = bool(master_weights)  # read by add_param_group during __init__
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, foreach=foreach, maximize=maximize,
                         capturable=capturable, differentiable=False, fused=fused,
                         decoupled_weight_decay=decoupled_weight_decay)
        self._fastlm_setup(max_grad_norm)


class AdamW(_FusedAdam, torch.optim.AdamW):
    _decoupled_default = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, *, maximize=False, foreach=None, capturable=False,
                 differentiable=False, fused=None, master_weights=False, max_grad_norm=None):
        _check_extras(differentiable, max_grad_norm)
        self._master_default = bool(master_weights)  # read by add_param_group during __init__
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, maximize=maximize, foreach=foreach,
                         capturable=capturable, differentiable=False, fused=fused)
        self._fastlm_setup(max_grad_norm)
