"""The shared step loop (engine_server.pipelines.loop) on a tiny noisy regression: events, checkpoints, resume."""
from __future__ import annotations

import pytest
import torch

from engine_server.pipelines.events import Cancelled
from engine_server.pipelines.loop import StepLoop


class Regression:
    """Fits w (3,) to noisy targets drawn from its own generator and torch's global RNG: resume must restore both."""

    def __init__(self, key: str | None = "a") -> None:
        torch.manual_seed(0)
        self.device = torch.device("cpu")
        self.gen = torch.Generator().manual_seed(1)
        self.w = torch.nn.Parameter(torch.zeros(3))
        self.optimizer = torch.optim.Adam([self.w], lr=0.1)
        self.step = 0
        self.checkpoint_key = key
        self.poison_at: int | None = None

    def training_step(self) -> tuple[torch.Tensor, dict]:
        x = torch.randn(8, 3, generator=self.gen)
        y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.1 * torch.randn(8)
        loss = ((x @ self.w - y) ** 2).mean()
        if self.step == self.poison_at:
            loss = loss * float("nan")
        return loss, {"mse": float(loss.detach())}

    def checkpoint_state(self) -> dict:
        return {"w": self.w.detach().clone()}

    def restore_state(self, state: dict) -> None:
        with torch.no_grad():
            self.w.copy_(state["w"])

    def generators(self) -> dict[str, torch.Generator]:
        return {"data": self.gen}

    def snapshot(self) -> dict:
        return {"preview": self.w.detach().numpy().copy()}


def _loop(path, events=None, cancelled=lambda: False, total=6) -> StepLoop:
    return StepLoop("fit", total, preview_every=4, checkpoint_every=2, checkpoint_path=path,
                    progress=(events.append if events is not None else lambda e: None), cancelled=cancelled)


def test_events_previews_and_losses():
    events = []
    system = Regression()
    losses = _loop(None, events).run(system)
    assert system.step == 6 and len(losses) == 6 and losses[-1] < losses[0]
    # One event as the stage begins (step 0, no loss yet: a progress bar shows at once), then one per step.
    assert [(e.stage, e.step, e.total) for e in events] == [("fit", s, 6) for s in range(0, 7)]
    assert [e.step for e in events if e.preview is not None] == [4, 6]  # every 4th and the last
    assert [e.loss for e in events] == [None, *losses] and events[-1].eta_s == pytest.approx(0.0)


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    full = Regression()
    full_losses = _loop(None).run(full)

    calls = {"n": 0}

    def cancel_before_step_3() -> bool:
        calls["n"] += 1
        return calls["n"] > 3

    with pytest.raises(Cancelled):
        _loop(tmp_path / "fit.pt", cancelled=cancel_before_step_3).run(Regression())
    torch.randn(100)  # the global RNG moves on meanwhile; the checkpoint must put it back
    resumed = Regression()
    losses = _loop(tmp_path / "fit.pt").run(resumed)
    assert losses == full_losses[2:]  # the checkpoint of step 2, not of step 3
    assert torch.equal(resumed.w, full.w)


def test_a_checkpoint_of_another_key_is_ignored(tmp_path):
    _loop(tmp_path / "fit.pt").run(Regression(key="a"))
    other = Regression(key="b")
    assert not _loop(tmp_path / "fit.pt").resume(other) and other.step == 0
    same = Regression(key="a")
    assert _loop(tmp_path / "fit.pt").resume(same) and same.step == 6


def test_non_finite_loss_names_stage_and_step():
    system = Regression()
    system.poison_at = 3
    with pytest.raises(FloatingPointError, match="non-finite loss at fit step 3"):
        _loop(None).run(system)
