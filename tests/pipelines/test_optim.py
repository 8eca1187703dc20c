"""The fits' Adam equals torch.optim.Adam step by step, and resumes its own and torch.optim.Adam's checkpoints
(those written before it replaced torch's)."""
from __future__ import annotations

import pytest
import torch

from engine_server.pipelines.optim import Adam


def _params(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(50, 4, generator=g).requires_grad_(), torch.randn(7, generator=g).requires_grad_(),
            torch.randn(3, 3, generator=g).requires_grad_()]


def _groups(params):
    return [{"params": params[:1], "lr": 1e-2}, {"params": params[1:], "lr": 1e-3}]


def _loss(params, k: int) -> torch.Tensor:
    return sum(((p - 0.1 * k) ** 2).sum() * (i + 1) for i, p in enumerate(params)) + params[0].abs().sum()


def _run(opt, params, steps: range) -> None:
    for k in steps:
        opt.zero_grad(set_to_none=True)
        _loss(params[:2] if k % 3 == 0 else params, k).backward()  # some steps leave a parameter without grad
        opt.step()


def test_same_steps_as_torch_adam():
    ours_p, theirs_p = _params(0), _params(0)
    ours = Adam(_groups(ours_p), betas=(0.9, 0.99), eps=1e-15)
    theirs = torch.optim.Adam(_groups(theirs_p), betas=(0.9, 0.99), eps=1e-15)
    _run(ours, ours_p, range(12))
    _run(theirs, theirs_p, range(12))
    for a, b in zip(ours_p, theirs_p):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert not torch.equal(ours_p[0], _params(0)[0])  # it moved


@pytest.mark.parametrize("first", [Adam, torch.optim.Adam])
def test_checkpoints_resume(first):
    """A state_dict of either optimizer resumes in ours and continues exactly as without the break."""
    straight_p = _params(1)
    straight = torch.optim.Adam(_groups(straight_p), betas=(0.9, 0.99))
    _run(straight, straight_p, range(10))

    p1 = _params(1)
    o1 = first(_groups(p1), betas=(0.9, 0.99))
    _run(o1, p1, range(5))
    saved = o1.state_dict()
    p2 = [p.detach().clone().requires_grad_() for p in p1]
    o2 = Adam(_groups(p2), betas=(0.9, 0.99))
    o2.load_state_dict(saved)
    _run(o2, p2, range(5, 10))
    for a, b in zip(p2, straight_p):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_bad_groups_and_states_are_refused():
    with pytest.raises(ValueError, match="no parameters"):
        Adam([{"params": []}])
    with pytest.raises(ValueError, match="betas"):
        Adam([{"params": _params(0)}], betas=(0.9, 1.0))
    opt = Adam(_groups(_params(0)))
    with pytest.raises(ValueError, match="other parameter groups"):
        opt.load_state_dict(Adam([{"params": _params(0)}]).state_dict())
