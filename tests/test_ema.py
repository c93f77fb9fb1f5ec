"""The exponential moving average of the weights (pipelines.training.ema) against its closed form."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipelines.training.ema import EMA


def _net(value: float) -> nn.Module:
    net = nn.Linear(2, 1)
    with torch.no_grad():
        net.weight.fill_(value)
        net.bias.fill_(value)
    return net


def test_constant_decay_matches_the_closed_form():
    net = _net(0.0)
    ema = EMA(net, decay=0.9)
    with torch.no_grad():
        net.weight.fill_(1.0)
        net.bias.fill_(1.0)
    for step in range(1, 21):
        ema.update(net, step)
    # from 0 towards a constant 1: ema_n = 1 - 0.9^n
    expected = 1.0 - 0.9**20
    assert torch.allclose(ema.state_dict()["weight"], torch.full((1, 2), expected), atol=1e-6)
    assert ema.decay_at(1) == ema.decay_at(10_000) == 0.9


def test_warmup_decay_forgets_the_initialization():
    ema = EMA(_net(0.0), decay=0.999, warmup=True)
    assert ema.decay_at(1) == pytest.approx(2 / 11) and ema.decay_at(90) == pytest.approx(91 / 100)
    assert ema.decay_at(100_000) == 0.999  # the configured decay once (1 + s) / (10 + s) exceeds it
    target = _net(1.0)
    weight_of_init = 1.0
    for step in range(1, 1001):
        ema.update(target, step)
        weight_of_init *= ema.decay_at(step)
    # ema = 1 - (product of the decays), and the initialization's share is tiny after 1,000 steps
    assert torch.allclose(ema.state_dict()["bias"], torch.tensor([1.0 - weight_of_init]), atol=1e-6)
    assert weight_of_init < 1e-3 < 0.999**1000


def test_shadow_is_float32_and_round_trips():
    net = _net(2.0).to(torch.bfloat16)
    ema = EMA(net, decay=0.5)
    assert all(t.dtype == torch.float32 for t in ema.state_dict().values())
    other = EMA(_net(0.0), decay=0.5)
    other.load_state_dict(ema.state_dict())
    copy = other.copy_to(_net(0.0))
    assert torch.equal(copy.weight, torch.full((1, 2), 2.0))
    with pytest.raises(ValueError, match="decay"):
        EMA(net, decay=1.0)
    with pytest.raises(ValueError, match="does not match"):
        other.load_state_dict({"weight": torch.zeros(1, 2)})
