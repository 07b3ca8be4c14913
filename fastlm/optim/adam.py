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
"""

import torch

from ..ops.adam import adam_step_, sum_of_squares


def _check_extras(differentiable, max_grad_norm):
    if differentiable:
        raise ValueError("fastlm.optim: differentiable=True is not supported (use torch.optim)")
    if max_grad_norm is not None and not (float(max_grad_norm) > 0.0):
        raise ValueError(f"Invalid max_grad_norm value: {max_grad_norm}")


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

    def _state_for(self, p, group):
        state = self.state[p]
        master = group.get("master_weights", self._master_default) and p.dtype in (torch.float16, torch.bfloat16)
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
            if master and "master_param" not in state:
                state["master_param"] = p.detach().to(torch.float32, copy=True)
            for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                if key in state and not state[key].is_contiguous():
                    state[key] = state[key].contiguous()
        return state

    def _collect(self):
        """{(device, dtype, group index): lists} of the params that have a grad."""
        buckets = {}
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} (fastlm) does not support sparse "
                                       "gradients, please consider torch.optim.SparseAdam")
                if not p.is_contiguous():
                    raise RuntimeError(f"{type(self).__name__} (fastlm): parameters must be "
                                       "contiguous")
                state = self._state_for(p, group)
                b = buckets.setdefault((p.device, p.dtype, state["exp_avg"].dtype, gi),
                                       {"params": [], "grads": [], "exp_avgs": [],
                                        "exp_avg_sqs": [], "max_exp_avg_sqs": [], "masters": [],
                                        "steps": []})
                b["params"].append(p)
                b["grads"].append(p.grad.contiguous())
                b["exp_avgs"].append(state["exp_avg"])
                b["exp_avg_sqs"].append(state["exp_avg_sq"])
                if group["amsgrad"]:
                    b["max_exp_avg_sqs"].append(state["max_exp_avg_sq"])
                if "master_param" in state and group.get("master_weights",
                                                         self._master_default):
                    b["masters"].append(state["master_param"])
                b["steps"].append(state["step"])
        return buckets

    def _clip_coef(self, buckets, grad_scale):
        """Global gradient norm (of the unscaled grads) and the clip coefficient, as device
        tensors; per-device sums of squares are added on the first device."""
        per_device = {}
        for (dev, _, _, _), b in buckets.items():
            per_device.setdefault(dev, []).extend(b["grads"])
        if not per_device:
            return None
        sums = [sum_of_squares(gs) for gs in per_device.values()]
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
