"""The GPU path's choices, checked on a machine without one: how a worker names its GPU for the monitor,
what the profile expects a co-runner to show."""

from __future__ import annotations

import pytest
import torch

from slonn.scripts.profile import expected_signal
from slonn.workers.corunner import BurnSpec
from slonn.workers.device import gpu_uuid


def test_a_cpu_device_has_no_gpu_to_watch():
    assert gpu_uuid(torch.device("cpu")) == ""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_gpu_is_named_the_way_nvml_names_it():
    assert gpu_uuid(torch.device("cuda:0")).startswith("GPU-")


def test_a_cpu_corunner_is_expected_per_cpu_and_a_gpu_one_as_a_share_of_the_gpu():
    assert expected_signal(BurnSpec(2), n_cpus=2, burn_device="cpu") == 1.0
    assert expected_signal(BurnSpec(1, 0.5), n_cpus=2, burn_device="cpu") == 0.25
    assert expected_signal(BurnSpec(1, 0.5), n_cpus=2, burn_device="cuda:0") == 0.5
    assert expected_signal(BurnSpec(3), n_cpus=2, burn_device="cuda:0") == 1.0  # a GPU is busy at most all the time
