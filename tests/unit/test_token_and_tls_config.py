"""The server's transport-security settings: the token check (HTTP middleware, gRPC interceptor), the file checks,
and the serve flags."""

from __future__ import annotations

import argparse
import asyncio
from types import SimpleNamespace

import grpc
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from slonn.scheduler.config import ServerConfig, SLOClassConfig
from slonn.scheduler.security import OPEN_HTTP_PATHS, BearerToken, TokenInterceptor, read_token, token_middleware
from slonn.scripts import serve

CLASSES = {"c": SLOClassConfig("c", latency_ms=10)}


def test_the_token_must_match_exactly_after_bearer_in_any_case():
    check = BearerToken(b"abc")
    for right in ("Bearer abc", b"Bearer abc", "bearer abc", "BEARER abc", b"bEaReR abc"):
        assert check.allows(right), right
    for wrong in (None, "", "abc", "Bearer ab", "Bearer abcd", "Bearer  abc", "Bearer ábc", "Bearerabc",
                  "Basic abc", "Bearer\tabc", "bearer ABC"):
        assert not check.allows(wrong), wrong


def test_a_header_that_was_not_utf8_is_refused_not_an_error():
    """aiohttp keeps a header's non-UTF-8 bytes as surrogates, which str.encode() refuses."""
    check = BearerToken(b"abc")
    assert not check.allows(b"Bearer \xff\xfe".decode("utf-8", "surrogateescape"))
    assert not check.allows(b"Bearer \xff\xfe")


async def test_http_answers_401_to_a_non_utf8_authorization_header_and_takes_lowercase_bearer():
    app = web.Application(middlewares=[token_middleware(BearerToken(b"abc"))])

    async def ok(request):
        return web.Response(text="ok")

    app.router.add_get("/v2", ok)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        for header, status in ((b"Bearer \xff\xfe", b"401"), (b"bearer abc", b"200"), (b"Bearer abd", b"401")):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"GET /v2 HTTP/1.1\r\nHost: x\r\nAuthorization: " + header +
                         b"\r\nConnection: close\r\n\r\n")
            line = await asyncio.wait_for(reader.readline(), 30)
            writer.close()
            await writer.wait_closed()
            assert line.split()[1] == status, (header, line)
    finally:
        await server.close()


async def test_the_grpc_interceptor_takes_any_case_of_bearer_and_refuses_undecodable_values():
    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: None)

    async def continuation(details):
        return handler

    interceptor = TokenInterceptor(BearerToken(b"abc"))
    for value, allowed in (("bearer abc", True), ("BEARER abc", True), ("Bearer \udcff", False),
                           ("Bearer ab\xff", False), (None, False)):
        metadata = () if value is None else (("authorization", value),)
        details = SimpleNamespace(method="/slonn.v1.Inference/Infer", invocation_metadata=metadata)
        got = await interceptor.intercept_service(continuation, details)
        assert (got is handler) == allowed, value


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


def _pem_pair(tmp_path) -> None:
    """A real certificate and key (server.pem, server.key) in ``tmp_path``."""
    trustme = pytest.importorskip("trustme")
    cert = trustme.CA().issue_cert("127.0.0.1")
    cert.private_key_pem.write_to_path(str(tmp_path / "server.key"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "server.pem"))


@pytest.mark.parametrize(("files", "flags", "message"), [
    ({"token": "\n"}, ["--auth-token-file", "token"], "--auth-token-file {token}: the file is empty"),
    ({"c.pem": "not a certificate", "k.pem": "not a key"}, ["--tls-cert", "c.pem", "--tls-key", "k.pem"],
     "--tls-cert {c.pem} / --tls-key {k.pem}: cannot load a PEM certificate"),
    ({"ca.pem": "not a certificate"},
     ["--tls-cert", "server.pem", "--tls-key", "server.key", "--tls-client-ca", "ca.pem"],
     "--tls-client-ca {ca.pem}: cannot load PEM CA certificates"),
])
@pytest.mark.parametrize("frontends", ["1", "2"])
def test_a_bad_token_or_certificate_file_exits_2_naming_the_flag_and_file_before_anything_starts(
        tmp_path, capsys, monkeypatch, files, flags, message, frontends):
    started = []

    async def run_server(cfg):
        started.append("server")
        return 0

    monkeypatch.setattr(serve, "run_server", run_server)
    monkeypatch.setattr(serve.FrontendGroup, "run", lambda self: started.append("group") or 0)
    (tmp_path / "model").mkdir()
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    if "server.pem" in flags:
        _pem_pair(tmp_path)
    argv = [a if a.startswith("--") else str(tmp_path / a) for a in flags]
    code = serve.main(["--model-dir", str(tmp_path / "model"), "--workers", "2", "--frontends", frontends, *argv])
    err = capsys.readouterr().err
    assert code == 2 and not started
    for name in files:
        message = message.replace("{" + name + "}", str(tmp_path / name))
    assert err.startswith("slonn serve: " + message), err
    assert "Traceback" not in err
