"""`slonn serve --help` fits a screen; `--help-advanced` lists the flags it leaves out, which parse as before."""

import argparse

import pytest

from slonn.scripts import serve


ADVANCED_SERVE_FLAGS = ("--nice", "--worker-nice", "--cpus", "--worker-cpus", "--in-process", "--max-pending",
                        "--overhead-ms", "--refit-overrun-share", "--refit-contention-shift", "--worker-spin-ms",
                        "--tls-cert", "--tls-key", "--tls-client-ca", "--auth-token-file")


def _serve_help(flag: str, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        serve.main([flag])
    assert info.value.code == 0
    return capsys.readouterr().out


def test_serve_help_fits_one_screen_and_leaves_the_advanced_flags_out(capsys):
    out = _serve_help("--help", capsys)
    assert len(out.splitlines()) <= 40, out
    assert "--help-advanced" in out and "--model-dir" in out and "--policy" in out
    assert [f for f in ADVANCED_SERVE_FLAGS if f in out] == []


def test_serve_help_advanced_lists_every_flag(capsys):
    out = _serve_help("--help-advanced", capsys)
    p = argparse.ArgumentParser()
    serve.add_server_args(p)
    flags = [flag for action in p._actions for flag in action.option_strings]
    assert set(ADVANCED_SERVE_FLAGS) <= set(flags)
    assert [f for f in flags if f not in out] == []


def test_the_advanced_serve_flags_still_set_the_config():
    p = argparse.ArgumentParser()
    serve.add_server_args(p)
    cfg = serve.config_from_args(p.parse_args([
        "--overhead-ms", "2.5", "--worker-spin-ms", "20", "--refit-overrun-share", "0.5",
        "--refit-contention-shift", "inf", "--max-pending", "32"]))
    assert (cfg.overhead_ms, cfg.worker_spin_ms, cfg.refit_overrun_share, cfg.refit_contention_shift,
            cfg.max_pending) == (2.5, 20.0, 0.5, float("inf"), 32)
    assert serve.config_from_args(p.parse_args(["--in-process"])).in_process

