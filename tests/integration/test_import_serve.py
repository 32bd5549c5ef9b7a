"""A model trained with plain PyTorch, imported with `slonn import`, served next to the digits model.

Real worker processes and gRPC on 127.0.0.1:0; clients send raw features, the server standardises them.
Tests assert answers and status codes, never timings.
"""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
import pytest_asyncio
import torch
from safetensors.torch import save_file
from torch import nn

from slonn.scheduler.config import ServerConfig, SLOClassConfig
from slonn.scripts.cli import main as slonn
from slonn.workers.artifact import load_artifact
from slonn.workers.kernels_chooser import split_choice
from tests.serving import assert_matches_reference, started_server

pytestmark = pytest.mark.asyncio(loop_scope="module")

NAME = "tabular"
FEATURES = 20
LABELS = ["ant", "bee", "cat", "dog"]
# The digits model meets the 0.9 floor; the tabular one is held to its own dense accuracy instead.
CLASSES = {"relaxed": SLOClassConfig(
    "relaxed", latency_ms=10000, min_accuracy=0.9, on_late="serve", mode="accuracy",
    overrides=((NAME, SLOClassConfig("relaxed", latency_ms=10000, min_accuracy=0.0, max_accuracy_drop=0.03,
                                     on_late="serve", mode="accuracy")),))}


@pytest.fixture(scope="module")
def user_model(tmp_path_factory):
    """What a user brings: a plain MLP trained on standardised make_classification features, and the data."""
    from sklearn.datasets import make_classification

    x, y = make_classification(n_samples=1200, n_features=FEATURES, n_informative=10, n_classes=4,
                               random_state=0)
    x = (x * 5 + 40).astype(np.float32)  # raw features far from zero mean and unit scale
    names = np.array(LABELS)[y]
    x_train, x_val = x[:1000], x[1000:]
    mean, std = x_train.mean(0), x_train.std(0)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(FEATURES, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy((x_train - mean) / std), torch.from_numpy(y[:1000])
    for _ in range(30):
        for idx in torch.randperm(len(xt)).split(64):
            loss = nn.functional.cross_entropy(net(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    directory = tmp_path_factory.mktemp("user")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(directory / "net.safetensors"))
    np.savez(directory / "data.npz", X=x_train, y=names[:1000], X_val=x_val, y_val=names[1000:])
    return net.eval(), directory, x_val, (mean, std)


@pytest.fixture(scope="module")
def imported_dir(user_model):
    _, directory, _, _ = user_model
    out = directory / NAME
    rc = slonn(["import", str(directory / "net.safetensors"), "--data", str(directory / "data.npz"), "--name", NAME,
                "--preprocessing", "standardize", "--levels", "1,0.5,0.25", "--finetune-epochs", "2",
                "--out", str(out), "--json"])
    assert rc == 0
    return out


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def server(tiny_model_dir, imported_dir):
    cfg = ServerConfig(model_dirs=(tiny_model_dir, imported_dir), classes=CLASSES, host="127.0.0.1", port=0,
                       workers=1, max_batch=16, grace_s=5.0)
    srv = await started_server(cfg)
    yield srv
    await srv.stop()


async def test_list_models_states_each_models_input_contract(client, user_model):
    _, directory, _, _ = user_model
    models = {m.name: m for m in (await client.list_models()).models}
    assert set(models) == {"tiny", NAME}
    tab = models[NAME]
    assert list(tab.input_shape) == [FEATURES] and list(tab.labels) == LABELS and tab.activation == "relu"
    assert tab.input.features == FEATURES and tab.input.preprocessing == "standardize"
    x_train = np.load(directory / "data.npz")["X"]
    np.testing.assert_allclose(tab.input.min, x_train.min(0), rtol=1e-6)
    np.testing.assert_allclose(tab.input.max, x_train.max(0), rtol=1e-6)
    assert models["tiny"].input.preprocessing == "scale" and models["tiny"].input.max[10] == 16.0


async def test_raw_features_are_answered_as_the_users_model_would(client, user_model, imported_dir):
    net, _, x_val, (mean, std) = user_model
    model, manifest = load_artifact(imported_dir)
    results = await asyncio.gather(*(client.infer(NAME, "relaxed", x) for x in x_val[:40]))
    agree = 0
    for x, r in zip(x_val[:40], results):
        assert r.output.shape == (4,) and r.out_of_range_features == 0
        assert manifest.accuracy[r.level] >= manifest.accuracy[1.0] - 0.03  # the per-model relative floor
        kernel, run_level = split_choice(r.kernel, r.level)
        with torch.inference_mode():
            want = model(torch.from_numpy(x[None]), run_level).numpy()[0]
            original = net(torch.from_numpy((x[None] - mean) / std)).numpy()[0]
        assert_matches_reference(r.output, want, kernel)
        agree += int(r.output.argmax() == original.argmax())
    assert agree >= 36  # the served levels answer as the original on (nearly) every input


async def test_both_models_are_served_side_by_side(client, user_model):
    from slonn.workers.digits import load_split

    _, _, x_val, _ = user_model
    digits = load_split().x_test[:10]
    calls = [client.infer("tiny", "relaxed", x) for x in digits] + [client.infer(NAME, "relaxed", x) for x in x_val[:10]]
    results = await asyncio.gather(*calls)
    assert [r.output.shape for r in results] == [(10,)] * 10 + [(4,)] * 10


async def test_wrong_feature_count_names_the_expected_count(client):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.infer(NAME, "relaxed", np.zeros(64, np.float32))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"expected [{FEATURES}]" in err.value.details()


async def test_far_out_of_range_input_is_served_and_flagged(client, server, user_model):
    _, _, x_val, _ = user_model
    x = x_val[0].copy()
    x[[3, 7]] = 1e4
    before = server.metrics.out_of_range.labels(NAME)._value.get()
    result = await client.infer(NAME, "relaxed", x)
    assert result.out_of_range_features == 2 and result.output.shape == (4,)
    assert server.metrics.out_of_range.labels(NAME)._value.get() == before + 1


async def test_replay_sends_the_models_own_held_out_rows_and_scores_them(server, imported_dir):
    from slonn.scheduler.replay import replay
    from slonn.scheduler.trace import poisson_arrivals
    from slonn.workers.artifact import load_heldout

    rows = load_heldout(imported_dir)
    assert rows[0].shape[1] == FEATURES
    arrivals = poisson_arrivals(40.0, 1.0, {"relaxed": 1.0}, seed=3)
    records = await replay(f"127.0.0.1:{server.port}", NAME, arrivals, {"relaxed": 10000.0}, progress=False,
                           inputs=rows)
    assert len(records) == len(arrivals) and {r.status for r in records} == {"OK"}
    assert sum(r.correct for r in records) >= 0.6 * len(records)  # scored against the rows' own labels


async def test_replay_refuses_rows_of_another_width_naming_both_counts(server):
    from slonn.scheduler.replay import replay
    from slonn.scheduler.trace import poisson_arrivals

    arrivals = poisson_arrivals(10.0, 1.0, {"relaxed": 1.0}, seed=4)
    rows = np.zeros((5, 64), np.float32), np.zeros(5, np.int64)
    with pytest.raises(ValueError, match=f"takes {FEATURES} features; the inputs have 64"):
        await replay(f"127.0.0.1:{server.port}", NAME, arrivals, {"relaxed": 10000.0}, progress=False, inputs=rows)
