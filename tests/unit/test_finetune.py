"""SLO-aware fine-tuning: which levels a step trains, and that the recipe keeps the dense level where it was."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from slonn.workers.calibrate import accuracy_per_level
from slonn.workers.finetune import LARGE_DATA_ROWS, FinetuneConfig, default_lr, finetune, step_levels
from slonn.workers.layers import stack_from_sequential


def test_every_step_trains_the_dense_and_the_lowest_level_and_random_ones_between():
    rng = random.Random(0)
    levels = (0.5, 1.0, 0.25, 0.1, 0.05)
    seen = set()
    for _ in range(50):
        ks = step_levels(levels, 2, rng)
        assert ks[:2] == [1.0, 0.05] and len(ks) == 4 and len(set(ks)) == 4
        assert set(ks[2:]) <= {0.5, 0.25, 0.1}
        seen |= set(ks[2:])
    assert seen == {0.5, 0.25, 0.1}
    assert step_levels((1.0,), 2, rng) == [1.0]
    assert step_levels((1.0, 0.5), 2, rng) == [1.0, 0.5]
    assert step_levels((0.3,), 0, rng) == [1.0, 0.3]


def test_the_focus_level_is_trained_in_every_step_in_place_of_a_random_one():
    rng = random.Random(0)
    levels = (1.0, 0.5, 0.25, 0.1, 0.05, 0.02)
    seen = set()
    for _ in range(50):
        ks = step_levels(levels, 2, rng, focus=0.1)
        assert ks[:3] == [1.0, 0.02, 0.1] and len(ks) == 4
        assert ks[3] in {0.5, 0.25, 0.05}
        seen.add(ks[3])
    assert seen == {0.5, 0.25, 0.05}
    # Not a level between the dense and the lowest, or no random level to take: the rule without it.
    assert step_levels((1.0, 0.5, 0.25), 1, rng, focus=0.1) == [1.0, 0.25, 0.5]
    assert step_levels((1.0, 0.5, 0.1), 1, rng, focus=0.1) == [1.0, 0.1, 0.5]
    assert step_levels(levels, 0, rng, focus=0.1) == [1.0, 0.02]


def test_the_default_learning_rate_follows_the_rows():
    assert default_lr(1_437) == 1e-4 and default_lr(LARGE_DATA_ROWS - 1) == 1e-4
    assert default_lr(LARGE_DATA_ROWS) == default_lr(80_000) == 1e-3


def test_the_config_refuses_bad_values():
    with pytest.raises(ValueError, match="random_levels"):
        FinetuneConfig(random_levels=-1)
    with pytest.raises(ValueError, match="loss_floor"):
        FinetuneConfig(loss_floor=0.0)
    with pytest.raises(ValueError, match="focus_level"):
        FinetuneConfig(focus_level=1.5)
    with pytest.raises(ValueError, match="lr=0"):
        FinetuneConfig(lr=0.0)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: one thread is as fast, and the result does not depend on the count
    yield
    torch.set_num_threads(threads)


def test_finetuning_keeps_the_dense_accuracy_and_raises_the_lowest_level(one_thread):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1200, 16)).astype(np.float32)
    y = (x[:, :4].sum(1) > 0).astype(np.int64) + 2 * (x[:, 4] - x[:, 5] > 0).astype(np.int64)
    x_tr, y_tr, x_val, y_val = x[:900], y[:900], x[900:], y[900:]
    net = nn.Sequential(nn.Linear(16, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 4))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(net(xt), yt).backward()
        opt.step()
    model = stack_from_sequential(net.eval()).to_model()
    levels = (1.0, 0.25, 0.05)
    before = accuracy_per_level(model, x_val, y_val, levels)
    # The default recipe (T = 0.5, keep 0.1's focus absent here); 10 passes: 4 leave keep 0.05 within a few
    # rows of where it was on this 128-wide, 4-class toy.
    finetune(model, x_tr, y_tr, levels, FinetuneConfig(epochs=10, batch_size=64, lr=1e-3))
    after = accuracy_per_level(model, x_val, y_val, levels)
    assert before[1.0] > 0.85
    assert after[1.0] >= before[1.0] - 0.02  # 300 held-out rows: 6 rows
    assert after[0.05] > before[0.05]
