"""The GPU path's choices, checked on a machine without one: which device the monitor watches, what the
profile expects a co-runner to show."""

from __future__ import annotations

import pytest
import torch

from scripts.corunner import BurnSpec
from scripts.profile import expected_signal
from workers.device import gpu_index


def test_gpu_index_is_none_on_the_cpu_and_names_a_missing_gpu():
    assert gpu_index("cpu") is None
    if torch.cuda.is_available():
        assert gpu_index("cuda:0") == 0
    else:
        assert gpu_index("auto") is None
        with pytest.raises(ValueError, match="CUDA is not available"):
            gpu_index("cuda:1")


def test_a_cpu_corunner_is_expected_per_cpu_and_a_gpu_one_as_a_share_of_the_gpu():
    assert expected_signal(BurnSpec(2), n_cpus=2, burn_device="cpu") == 1.0
    assert expected_signal(BurnSpec(1, 0.5), n_cpus=2, burn_device="cpu") == 0.25
    assert expected_signal(BurnSpec(1, 0.5), n_cpus=2, burn_device="cuda:0") == 0.5
    assert expected_signal(BurnSpec(3), n_cpus=2, burn_device="cuda:0") == 1.0  # a GPU is busy at most all the time
