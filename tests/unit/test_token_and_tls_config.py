"""The server's transport-security settings: the token check, the file checks, and the serve flags."""

from __future__ import annotations

import argparse

import pytest

from slonn.scheduler.config import ServerConfig, SLOClassConfig
from slonn.scheduler.security import OPEN_HTTP_PATHS, BearerToken, read_token
from slonn.scripts import serve

CLASSES = {"c": SLOClassConfig("c", latency_ms=10)}


def test_the_token_must_match_exactly_after_bearer():
    check = BearerToken(b"abc")
    assert check.allows("Bearer abc") and check.allows(b"Bearer abc")
    for wrong in (None, "", "abc", "Bearer ab", "Bearer abcd", "bearer abc", "Bearer  abc", "Bearer ábc"):
        assert not check.allows(wrong), wrong


def test_the_token_file_is_stripped_and_must_not_be_empty(tmp_path):
    (tmp_path / "t").write_text("  tok\n")
    assert read_token(tmp_path / "t") == b"tok"
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="--auth-token-file .*empty"):
        read_token(tmp_path / "empty")


@pytest.mark.parametrize("path", ["/v2/health/live", "/v2/health/ready", "/v2/models/m/ready",
                                  "/v2/models/m/versions/1/ready"])
def test_health_and_readiness_paths_are_open(path):
    assert OPEN_HTTP_PATHS.fullmatch(path)


@pytest.mark.parametrize("path", ["/v2", "/v2/models/m", "/v2/models/m/infer", "/v2/models/m/ready/x",
                                  "/v2/health/readyz", "/x/v2/health/live"])
def test_other_paths_need_the_token(path):
    assert not OPEN_HTTP_PATHS.fullmatch(path)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"tls_cert": "c.pem"}, "go together"),
    ({"tls_key": "k.pem"}, "go together"),
    ({"tls_client_ca": "ca.pem"}, "needs tls_cert"),
    ({"tls_cert": "missing.pem", "tls_key": "k.pem"}, "tls_cert=.*no such file"),
    ({"auth_token_file": "missing"}, "auth_token_file=.*no such file"),
])
def test_security_settings_are_checked_at_start(tmp_path, kwargs, message):
    (tmp_path / "k.pem").write_text("key")
    (tmp_path / "c.pem").write_text("cert")
    with pytest.raises(ValueError, match=message):
        ServerConfig(model_dirs=(tmp_path,), classes=CLASSES,
                     **{k: tmp_path / v for k, v in kwargs.items()})


def test_the_serve_flags_set_the_security_settings(tmp_path):
    for name in ("c.pem", "k.pem", "ca.pem", "token"):
        (tmp_path / name).write_text("x")
    p = argparse.ArgumentParser()
    serve.add_server_args(p)
    cfg = serve.config_from_args(p.parse_args([
        "--tls-cert", str(tmp_path / "c.pem"), "--tls-key", str(tmp_path / "k.pem"),
        "--tls-client-ca", str(tmp_path / "ca.pem"), "--auth-token-file", str(tmp_path / "token")]))
    assert (cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca, cfg.auth_token_file) == (
        tmp_path / "c.pem", tmp_path / "k.pem", tmp_path / "ca.pem", tmp_path / "token")
