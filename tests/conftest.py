"""Markers by folder: tests/unit -> unit, tests/integration -> integration."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = Path(str(item.fspath))
        if (HERE / "unit") in path.parents:
            item.add_marker(pytest.mark.unit)
        elif (HERE / "integration") in path.parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A small real artifact: a plain MLP trained on the digits (2 x 128 hidden), imported (a few seconds)."""
    from slonn.workers.train import TrainConfig, train_to

    import torch

    directory = tmp_path_factory.mktemp("models") / "tiny"
    threads = torch.get_num_threads()
    try:  # one thread: small matmuls on a shared 2-core machine ran ~10x slower on two
        train_to(directory, TrainConfig(name="tiny", hidden=(128, 128), epochs=30, finetune_epochs=15, lr=3e-3, finetune_lr=1e-3,
                                        levels=(1.0, 0.5, 0.25, 0.1), threads=1))
    finally:
        torch.set_num_threads(threads)
    return directory
