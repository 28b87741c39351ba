"""Adam whose CPU step updates all of a parameter group's tensors at once, with the same numbers.

``torch.optim.Adam(foreach=True)`` on a CPU has no multi-tensor kernels: each of its ten elementwise
updates is a loop of one small operator call per tensor (plus two host reads of every step counter).
The networks here have 10-20 tensors of a few thousand elements, so that per-call cost is most of the
step. ``FlatAdam`` keeps each group's first and second moments in one flat buffer (the optimiser state
holds views into it, laid out like their parameters, so ``state_dict`` is unchanged), gathers the
gradients and parameters into flat buffers, runs each update once over all of them and copies the
parameters back.

The numbers are Adam's to the bit: every update is elementwise, torch computes an element the same
way wherever it sits in a tensor (vectorised body or scalar tail; tested), and the scalars (bias
corrections, step size) are computed by the same Python expressions as torch's step. Anything the flat
step does not cover (another device, a parameter without a gradient, unequal step counts, complex or
mixed dtypes, the amsgrad / maximize / capturable / differentiable / decoupled-weight-decay variants,
tensor hyper-parameters, a closure) runs torch's own step, which updates the same state tensors in place.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class _FlatGroup:
    params: list[torch.Tensor]  # the group's parameters when the buffers were made (identity checked)
    exp_avg: list[torch.Tensor]  # the state tensors: views into ``moments[0]``, ``moments[1]``
    exp_avg_sq: list[torch.Tensor]
    moments: tuple[torch.Tensor, torch.Tensor]
    grad: torch.Tensor  # flat gradient and parameter buffers, and their per-tensor views
    param: torch.Tensor
    grad_views: list[torch.Tensor]
    param_views: list[torch.Tensor]


def _dense_views(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Views into ``flat``, one per tensor of ``like``, each with that tensor's shape and a dense layout in
    its dimension order (channels-last stays channels-last), so copies between them are plain runs."""
    views, offset = [], 0
    for t in like:
        stride = torch.empty_like(t, device="meta", memory_format=torch.preserve_format).stride()
        views.append(flat.as_strided(t.shape, stride, offset))
        offset += t.numel()
    return views


class FlatAdam(torch.optim.Adam):
    """``torch.optim.Adam(..., foreach=True)`` with the one-pass CPU step described in the module doc."""

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0, **kwargs):
        kwargs.setdefault("foreach", True)
        super().__init__(params, lr=lr, weight_decay=weight_decay, **kwargs)
        self._flat: dict[int, _FlatGroup] = {}

    def _plain(self, group: dict) -> bool:
        """Whether ``group`` can take the flat step (its gradients present, everything on the CPU, ...)."""
        if (group["amsgrad"] or group["maximize"] or group["capturable"] or group["differentiable"]
                or group.get("decoupled_weight_decay", False) or group.get("fused")):
            return False
        if any(isinstance(v, torch.Tensor) for v in (group["lr"], group["eps"], *group["betas"])):
            return False
        params = group["params"]
        if not params:
            return False
        dtype = params[0].dtype
        if not dtype.is_floating_point:
            return False
        for p in params:
            g = p.grad
            if (g is None or g.is_sparse or p.device.type != "cpu" or p.dtype != dtype or g.dtype != dtype
                    or g.device.type != "cpu"):
                return False
            state = self.state.get(p)
            if not state or "exp_avg" not in state or "max_exp_avg_sq" in state:
                return False  # the first step creates the state: torch's step does that
        return True

    def _buffers(self, index: int, group: dict) -> _FlatGroup:
        """The group's flat buffers; (re)made when the state tensors are not their views (first flat step,
        after ``load_state_dict`` or ``add_param_group``), with the state's values copied in."""
        params = group["params"]
        flat = self._flat.get(index)
        if flat is not None and len(flat.params) == len(params) and all(
                a is b and self.state[a]["exp_avg"] is m and self.state[a]["exp_avg_sq"] is v
                for a, b, m, v in zip(flat.params, params, flat.exp_avg, flat.exp_avg_sq)):
            return flat
        n = sum(p.numel() for p in params)
        moments = (params[0].new_empty(n), params[0].new_empty(n))
        exp_avg, exp_avg_sq = _dense_views(moments[0], params), _dense_views(moments[1], params)
        with torch.no_grad():
            for p, m, v in zip(params, exp_avg, exp_avg_sq):
                m.copy_(self.state[p]["exp_avg"])
                v.copy_(self.state[p]["exp_avg_sq"])
                self.state[p]["exp_avg"], self.state[p]["exp_avg_sq"] = m, v
        grad, param = params[0].new_empty(n), params[0].new_empty(n)
        flat = _FlatGroup(list(params), exp_avg, exp_avg_sq, moments, grad, param,
                          _dense_views(grad, params), _dense_views(param, params))
        self._flat[index] = flat
        return flat

    def step(self, closure=None):
        """One Adam step: the flat one when every group allows it, torch's own otherwise."""
        plan = None if closure is not None else self._plan()
        if plan is None:
            return super().step(closure)
        with torch.no_grad():
            for index, group, steps in plan:
                self._flat_step(self._buffers(index, group), group, steps)
        return None

    def _plan(self) -> list[tuple[int, dict, list[torch.Tensor]]] | None:
        """(index, group, step counters) per group, or None when some group needs torch's step."""
        plan = []
        for index, group in enumerate(self.param_groups):
            if not self._plain(group):
                return None
            steps = [self.state[p]["step"] for p in group["params"]]
            first = steps[0].item()
            if any(s.item() != first for s in steps[1:]):
                return None
            plan.append((index, group, steps))
        return plan

    @staticmethod
    def _flat_step(flat: _FlatGroup, group: dict, steps: list[torch.Tensor]) -> None:
        # The operations and scalars of torch's foreach Adam step (torch/optim/adam.py,
        # _multi_tensor_adam, capturable=False), each applied once to the flat buffers.
        beta1, beta2 = group["betas"]
        lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
        torch._foreach_add_(steps, torch.tensor(1.0, device="cpu"), alpha=1.0)
        params = flat.params
        torch._foreach_copy_(flat.grad_views, [p.grad for p in params])
        torch._foreach_copy_(flat.param_views, params)
        grad = flat.grad
        if weight_decay != 0:
            grad = torch.add(grad, flat.param, alpha=weight_decay)
        exp_avg, exp_avg_sq = flat.moments
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2)
        exp_avg_sq.addcmul_(grad, grad, value=1 - beta2)
        step = steps[0].item()
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        step_size = (lr / bias_correction1) * -1
        denom = exp_avg_sq.sqrt()
        denom.div_(bias_correction2**0.5)
        denom.add_(eps)
        flat.param.addcdiv_(exp_avg, denom, value=step_size)
        torch._foreach_copy_(params, flat.param_views)
