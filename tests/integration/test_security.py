"""Mutual TLS and a bearer token on both ports, with certificates made here (trustme): slonn's own clients
with the CA, a client certificate and the token get answers; without the token a call is UNAUTHENTICATED
(HTTP 401); without a client certificate, or in plaintext, there is no connection; health stays open.
"""

from __future__ import annotations

import asyncio
import json
import ssl

import aiohttp
import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from slonn.protos.client import AsyncSlonnClient, ClientSecurity, make_request
from slonn.scheduler.config import ServerConfig, SLOClassConfig
from slonn.scripts import infer
from tests.serving import started_server, x

trustme = pytest.importorskip("trustme")

pytestmark = pytest.mark.asyncio(loop_scope="module")

MODEL = "tiny"
CLASSES = {"relaxed": SLOClassConfig("relaxed", latency_ms=10000, min_accuracy=0.0, on_late="serve")}
TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, the server's certificate for 127.0.0.1, a client certificate, and the token file."""
    d = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    for name, cert in (("server", ca.issue_cert("127.0.0.1", "localhost")), ("client", ca.issue_cert("client"))):
        cert.private_key_pem.write_to_path(str(d / f"{name}.key"))
        for blob in cert.cert_chain_pems:
            blob.write_to_path(str(d / f"{name}.pem"), append=True)
    (d / "token").write_text(TOKEN + "\n")
    return d


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def server(tiny_model_dir, pki):
    cfg = ServerConfig(model_dirs=(tiny_model_dir,), classes=CLASSES, host="127.0.0.1", port=0, http_port=0,
                       workers=1, max_batch=8, grace_s=2.0, tls_cert=pki / "server.pem", tls_key=pki / "server.key",
                       tls_client_ca=pki / "ca.pem", auth_token_file=pki / "token")
    srv = await started_server(cfg)
    yield srv
    await srv.stop()


def security(pki, token: bool = True, client_cert: bool = True) -> ClientSecurity:
    return ClientSecurity(ca_file=pki / "ca.pem", cert_file=pki / "client.pem" if client_cert else None,
                          key_file=pki / "client.key" if client_cert else None,
                          token_file=pki / "token" if token else None)


async def status(coro) -> str:
    try:
        await coro
    except grpc.aio.AioRpcError as exc:
        return exc.code().name
    return "OK"


async def test_a_client_with_the_certificates_and_the_token_is_answered(server, pki):
    async with AsyncSlonnClient(f"127.0.0.1:{server.port}", security(pki)) as client:
        done = await client.infer(MODEL, "relaxed", x(1), timeout_s=30)
        assert done.output.shape == (10,)
        answers = [a async for a in client.infer_stream(_one(make_request(MODEL, "relaxed", x(2), "s1")))]
        assert [a.WhichOneof("result") for a in answers] == ["response"]


async def _one(request):
    yield request


@pytest.mark.parametrize("token", [None, "Bearer wrong", f"Bearer {TOKEN}x", TOKEN])
async def test_a_call_without_the_right_token_is_unauthenticated(server, pki, token):
    sec = security(pki, token=False)
    refused = denied(server, "grpc")
    async with AsyncSlonnClient(f"127.0.0.1:{server.port}", sec) as client:
        md = () if token is None else (("authorization", token),)
        unary = client.stub.Infer(make_request(MODEL, "relaxed", x(3)), timeout=30, metadata=md)
        assert await status(unary) == "UNAUTHENTICATED"
        stream = client.stub.InferStream(_one(make_request(MODEL, "relaxed", x(4))), metadata=md)
        assert await status(_drain(stream)) == "UNAUTHENTICATED"
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await client.list_models()
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED and "bearer token" in info.value.details()
    assert denied(server, "grpc") == refused + 3  # counted in slonn_unauthenticated_total{protocol}


def denied(server, protocol: str) -> float:
    """slonn_unauthenticated_total for ``protocol`` so far."""
    return server.metrics.registry.get_sample_value("slonn_unauthenticated_total", {"protocol": protocol}) or 0.0


async def test_the_bearer_scheme_is_matched_in_any_case_over_grpc_and_http(server, pki):
    """RFC 7235: the scheme name is case-insensitive; the token itself is not."""
    async with AsyncSlonnClient(f"127.0.0.1:{server.port}", security(pki, token=False)) as client:
        for token, want in ((f"bearer {TOKEN}", "OK"), (f"BEARER {TOKEN}", "OK"), (f"bearer {TOKEN.upper()}",
                                                                                 "UNAUTHENTICATED")):
            call = client.stub.Infer(make_request(MODEL, "relaxed", x(7)), timeout=30,
                                     metadata=(("authorization", token),))
            assert await status(call) == want, token
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": x(8).tolist()}]}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        async with http.post(f"https://127.0.0.1:{server.http_port}/v2/models/{MODEL}/infer", json=body,
                             ssl=_ssl(pki), headers={"Authorization": f"bearer {TOKEN}"}) as r:
            assert r.status == 200


async def _drain(call):
    return [a async for a in call]


async def test_health_is_open_without_a_token(server, pki):
    async with AsyncSlonnClient(f"127.0.0.1:{server.port}", security(pki, token=False)) as client:
        resp = await health_pb2_grpc.HealthStub(client.channel).Check(health_pb2.HealthCheckRequest(service=MODEL),
                                                                      timeout=10)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("how", ["plaintext", "no-client-certificate"])
async def test_no_connection_without_tls_or_without_a_client_certificate(server, pki, how):
    target = f"127.0.0.1:{server.port}"
    client = (AsyncSlonnClient(target, ClientSecurity(token_file=pki / "token")) if how == "plaintext"
              else AsyncSlonnClient(target, security(pki, client_cert=False)))
    async with client:
        assert await status(client.infer(MODEL, "relaxed", x(5), timeout_s=10)) == "UNAVAILABLE"


def _ssl(pki, client_cert: bool = True) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    if client_cert:
        context.load_cert_chain(pki / "client.pem", pki / "client.key")
    return context


async def test_http_needs_the_client_certificate_and_the_token_except_for_health(server, pki):
    base = f"https://127.0.0.1:{server.http_port}/v2"
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": x(6).tolist()}]}
    auth = {"Authorization": f"Bearer {TOKEN}"}
    refused = denied(server, "http")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        for path in ("/health/live", "/health/ready", f"/models/{MODEL}/ready"):
            async with http.get(base + path, ssl=_ssl(pki)) as r:
                assert r.status == 200, path
        async with http.get(f"{base}/models/{MODEL}", ssl=_ssl(pki)) as r:
            assert r.status == 401 and "bearer token" in (await r.json())["error"]
        async with http.post(f"{base}/models/{MODEL}/infer", json=body, ssl=_ssl(pki),
                             headers={"Authorization": "Bearer nope"}) as r:
            assert r.status == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
        async with http.post(f"{base}/models/{MODEL}/infer", json=body, ssl=_ssl(pki), headers=auth) as r:
            assert r.status == 200 and len((await r.json())["outputs"][0]["data"]) == 10
        assert denied(server, "http") == refused + 2
        with pytest.raises(aiohttp.ClientError):
            async with http.get(base + "/health/live", ssl=_ssl(pki, client_cert=False)) as r:
                await r.read()


async def test_slonn_infer_takes_the_ca_the_client_certificate_and_the_token(server, pki, capsys):
    args = ["--target", f"127.0.0.1:{server.port}", "--model", MODEL, "--slo-class", "relaxed", "--index", "3",
            "--tls-ca", str(pki / "ca.pem"), "--tls-cert", str(pki / "client.pem"), "--tls-key",
            str(pki / "client.key")]
    assert await asyncio.to_thread(infer.main, [*args, "--auth-token-file", str(pki / "token")]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["prediction"] in range(10) and answer["label"] is not None
    assert await asyncio.to_thread(infer.main, args) == 1  # no token
    assert capsys.readouterr().err.startswith("UNAUTHENTICATED")
