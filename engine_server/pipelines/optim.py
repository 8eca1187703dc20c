"""Adam for the field fits, without ``torch.optim``.

``torch.optim``'s optimizers import ``torch._dynamo`` the first time a parameter group is added
(1.5-4 s on two CPU cores, before a draft's first step); the fits need plain Adam and nothing
else. Same update and ``state_dict`` layout as ``torch.optim.Adam`` (a checkpoint written with
torch's resumes here); ``tests/pipelines/test_optim.py`` compares them step by step.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch


class Adam:
    """Adam (Kingma & Ba) over parameter groups ``[{"params": [...], "lr": ...}, ...]``; no weight decay."""

    def __init__(self, groups: Iterable[dict], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.param_groups: list[dict] = []
        for group in groups:
            params = list(group["params"])
            if not params:
                raise ValueError("an Adam parameter group has no parameters")
            g = {"lr": lr, "betas": tuple(betas), "eps": eps, **group, "params": params}
            if g["lr"] < 0 or g["eps"] < 0 or not all(0.0 <= b < 1.0 for b in g["betas"]):
                raise ValueError(f"Adam needs lr >= 0, eps >= 0 and betas in [0, 1), got lr={g['lr']}, "
                                 f"eps={g['eps']}, betas={g['betas']}")
            self.param_groups.append(g)
        self.state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state.get(p)
                if state is None:
                    state = self.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                             "exp_avg_sq": torch.zeros_like(p)}
                state["step"] += 1
                n = float(state["step"])
                state["exp_avg"].lerp_(p.grad, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2**n)).add_(group["eps"])
                p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - beta1**n))

    def state_dict(self) -> dict:
        """``torch.optim``'s layout: per-parameter state by index, groups with their parameters' indices."""
        index: dict[int, int] = {}
        groups = []
        for group in self.param_groups:
            ids = [index.setdefault(id(p), len(index)) for p in group["params"]]
            groups.append({k: v for k, v in group.items() if k != "params"} | {"params": ids})
        flat = [p for group in self.param_groups for p in group["params"]]
        state = {index[id(p)]: {k: v.clone() for k, v in self.state[p].items()} for p in flat if p in self.state}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, saved: dict) -> None:
        groups = saved["param_groups"]
        if [len(g["params"]) for g in groups] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError("the saved optimizer state has other parameter groups than this fit")
        flat = [p for group in self.param_groups for p in group["params"]]
        ids = [i for g in groups for i in g["params"]]
        for group, g in zip(self.param_groups, groups):
            group.update({k: v for k, v in g.items() if k != "params"})
        self.state = {}
        for p, i in zip(flat, ids):
            if i in saved["state"]:
                self.state[p] = {k: v.to(p.device) if k != "step" else v.float().cpu()
                                 for k, v in saved["state"][i].items()}
