"""profile_frontend's reading of py-spy output: whose each sample is, and which thread group."""

from __future__ import annotations

from bench.profile_frontend import UNSEEN, owner, parse_raw, split_samples, thread_group, thread_names

ROOT = ["_run_module_as_main (<frozen runpy>:198)", "<module> (slonn/scripts/cli.py:49)",
        "main (slonn/scripts/serve.py:200)", "run (slonn/scheduler/aio.py:32)", "run (uvloop/__init__.py:92)",
        "Runner.run (asyncio/runners.py:118)"]


def test_the_entry_point_and_loop_runner_do_not_make_a_sample_slonns():
    assert owner(ROOT) == UNSEEN
    assert owner(ROOT + ["_handle_events (grpc/aio/_server.py:10)"]) == "grpc"
    assert owner(ROOT + ["Queue.put (asyncio/queues.py:1)"]) == "event loop"


def test_a_sample_under_slonn_code_is_slonns_by_its_innermost_module_or_library():
    assert owner(ROOT + ["Infer (slonn/scheduler/server.py:123)"]) == "slonn:servicer"
    assert owner(ROOT + ["Infer (slonn/scheduler/server.py:123)", "from_tensor (slonn/protos/tensors.py:40)"]) \
        == "slonn:tensor conversion"
    assert owner(ROOT + ["_finish (slonn/scheduler/dispatcher.py:250)", "inc (prometheus_client/metrics.py:300)"]) \
        == "slonn:metrics"
    assert owner(ROOT + ["_launch (slonn/scheduler/dispatcher.py:230)", "debug (logging/__init__.py:1)"]) \
        == "slonn:logging"
    assert owner(["Thread.run (threading.py:982)", "ContentionMonitor._loop (slonn/policy/contention.py:308)"]) \
        == "slonn:contention monitor"


def test_parse_raw_groups_by_thread_drops_idle_native_samples_and_names_threads():
    raw = "\n".join([
        "thread (100): MainThread;" + ";".join(ROOT) + ";Infer (slonn/scheduler/server.py:123) 7",
        "thread (100): MainThread;" + ";".join(ROOT) + ";uv_run (core.c:464);epoll_pwait (libc.so.6) 50",
        "thread (101): Thread-2 (_poll_wrapper);Thread.run (threading.py:982);0x7f (grpc/_cython/cygrpc.so) 3",
    ])
    by_thread = parse_raw(raw)
    assert sum(n for _, n in by_thread["thread (100): MainThread"]) == 7  # the 50 idle ones are dropped
    assert split_samples(by_thread["thread (100): MainThread"]) == {"slonn:servicer": 1.0}
    assert split_samples(by_thread["thread (101): Thread-2 (_poll_wrapper)"]) == {"grpc": 1.0}
    assert thread_names(raw) == {100: "MainThread", 101: "Thread-2 (_poll_wrapper)"}


def test_thread_groups():
    assert thread_group(100, 100, "MainThread") == "event-loop thread"
    assert thread_group(101, 100, "Thread-2 (_poll_wrapper)") == "grpc poller thread"
    assert thread_group(102, 100, "contention-monitor") == "slonn monitor and learner threads"
    assert thread_group(103, 100, None) == "threads with no Python (grpc core, torch)"
