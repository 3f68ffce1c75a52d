import ast
from pathlib import Path

import pytest
import torch
from torch import nn

from nwflow.train import train_velocity


class Linear(nn.Module):
    """v(x, t) = A x + b t: the regression below has an exact least-squares answer."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)

    def forward(self, x, t):
        return self.lin(x)


A = torch.tensor([[0.5, -1.0], [2.0, 0.25]])
b = torch.tensor([0.3, -0.7])


def batch_fn(step, gen):
    x = torch.randn(64, 2, generator=gen)
    t = torch.rand(64, generator=gen)
    return x, t, x @ A.T + b


def test_training_recovers_a_linear_field():
    torch.manual_seed(0)
    model = Linear()
    hist = train_velocity(model, batch_fn, steps=600, lr=2e-2, progress=False, grad_clip=None)
    assert len(hist["loss"]) == 600 and hist["loss"][-1] < 1e-4 < hist["loss"][0]
    torch.testing.assert_close(model.lin.weight.detach(), A, atol=1e-2, rtol=0)
    torch.testing.assert_close(model.lin.bias.detach(), b, atol=1e-2, rtol=0)


def test_resume_equals_uninterrupted(tmp_path):
    torch.manual_seed(1)
    straight = Linear()
    resumed = Linear()
    resumed.load_state_dict(straight.state_dict())
    h1 = train_velocity(straight, batch_fn, steps=40, lr=1e-2, progress=False)
    ckpt = tmp_path / "run.pt"
    train_velocity(resumed, batch_fn, steps=20, lr=1e-2, progress=False, checkpoint=ckpt,
                   checkpoint_every=10, config={"a": 1})
    h2 = train_velocity(resumed, batch_fn, steps=40, lr=1e-2, progress=False, checkpoint=ckpt,
                        checkpoint_every=10, config={"a": 1})
    assert h2["step"] == list(range(40))
    torch.testing.assert_close(torch.tensor(h2["loss"]), torch.tensor(h1["loss"]))
    torch.testing.assert_close(resumed.lin.weight, straight.lin.weight)
    assert not list(tmp_path.glob("*.tmp")), "atomic write left a temporary file"


def test_checkpoint_with_other_config_is_refused(tmp_path):
    ckpt = tmp_path / "run.pt"
    train_velocity(Linear(), batch_fn, steps=2, progress=False, checkpoint=ckpt, config={"lr": 1})
    with pytest.raises(ValueError, match="config"):
        train_velocity(Linear(), batch_fn, steps=4, progress=False, checkpoint=ckpt, config={"lr": 2})


@pytest.mark.parametrize("kwargs, match", [({"steps": -1}, "steps"), ({"steps": 2, "lr": 0.0}, "lr"),
                                           ({"steps": 2, "checkpoint_every": 0}, "checkpoint_every")])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        train_velocity(Linear(), batch_fn, **kwargs)


def test_non_finite_loss_stops():
    def bad(step, gen):
        x = torch.randn(4, 2)
        return x, torch.rand(4), torch.full((4, 2), float("nan"))

    with pytest.raises(FloatingPointError, match="step 0"):
        train_velocity(Linear(), bad, steps=3, progress=False)


def test_train_imports_only_the_floors():
    """train sits below the experiments: its nwflow imports are the checks, the atomic writer and the bar."""
    tree = ast.parse((Path(__file__).resolve().parents[1] / "nwflow" / "train.py").read_text())
    names = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    floors = {"nwflow._checks", "nwflow._io", "nwflow._progress"}
    assert {n for n in names if n.startswith("nwflow")} == floors
