"""The OpenAI-compatible HTTP API, API keys and TLS on the standalone server, tested with the
official `openai` client over real loopback sockets (fake deterministic backends, real DecodeLoop)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
import threading
import time

import grpc
import httpx2 as httpx
import openai
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from specserve.client import SpecServeClient, SpecServeError
from specserve.serve.auth import APIKeys, check_exposure
from specserve.serve.grpc_server import ServerConfig, StandaloneServer
from test_grpc_support import FakeVerifier, ServerThread, expected_continuation, free_port, make_service

PROMPT = "The quick brown fox"
CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"


def chat_service(**kw):
    service = make_service(**kw)
    service.tokenizer.chat_template = CHAT_TEMPLATE
    return service


@pytest.fixture(scope="module")
def server():
    with ServerThread(chat_service(), http_port=free_port()) as s:
        yield s


def http_base(s) -> str:
    return f"http://127.0.0.1:{s.server.http_port}/v1"


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=http_base(server), api_key="unused", max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def grpc_client(server):
    with SpecServeClient(server.target, timeout=30) as c:
        yield c


GREEDY = {"rule": "greedy", "draft_length": 4}


def test_chat_completion_equals_the_grpc_api(oai, grpc_client):
    resp = oai.chat.completions.create(model="m", messages=[{"role": "user", "content": PROMPT}], max_tokens=40,
                                       temperature=0, extra_body=GREEDY)
    want = grpc_client.generate(PROMPT, chat=True, max_new_tokens=40, rule="greedy", draft_length=4)
    assert resp.choices[0].message.content == want.text and want.text
    assert resp.choices[0].message.role == "assistant" and resp.choices[0].finish_reason == "length"
    assert resp.object == "chat.completion" and resp.id.startswith("chatcmpl-")
    assert resp.usage.completion_tokens == 40 and resp.usage.prompt_tokens == want.stats.prompt_tokens
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 40
    spec = resp.model_extra["speculative_decoding"]
    assert spec["num_draft_tokens"] == want.stats.drafted > 0 and spec["num_accepted_tokens"] == want.stats.accepted
    assert spec["mean_acceptance_length"] == pytest.approx(1 + want.stats.accepted / want.stats.rounds)
    assert spec["rule"] == "greedy" and spec["lossy"] is False


def test_completion_unary_and_streaming_equal_the_grpc_api(oai, grpc_client):
    want = grpc_client.generate(PROMPT, max_new_tokens=30, rule="greedy", draft_length=4)
    assert list(want.token_ids) == expected_continuation(list(PROMPT.encode()), 30)
    unary = oai.completions.create(model="m", prompt=PROMPT, max_tokens=30, extra_body=GREEDY)
    assert unary.choices[0].text == want.text and unary.object == "text_completion"
    chunks = list(oai.completions.create(model="m", prompt=PROMPT, max_tokens=30, stream=True,
                                         stream_options={"include_usage": True}, extra_body=GREEDY))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
    assert sum(1 for c in chunks if c.choices and c.choices[0].text) > 2  # it really streams, round by round
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 30  # usage in the last chunk
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]


def test_chat_streaming_and_stop(oai, grpc_client):
    full = grpc_client.generate(PROMPT, chat=True, max_new_tokens=40, rule="greedy").text
    stop = full[10:13]
    stream = oai.chat.completions.create(model="m", messages=[{"role": "user", "content": PROMPT}], max_tokens=40,
                                         stream=True, stop=stop, extra_body={"rule": "greedy"})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == full[: full.index(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert "speculative_decoding" in chunks[-1].model_extra


def test_multi_turn_chat_uses_the_chat_template(oai, server):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": PROMPT}]
    resp = oai.chat.completions.create(model="m", messages=messages, max_tokens=12, extra_body={"rule": "greedy"})
    prompt_ids = list(f"<system>be brief<user>{PROMPT}<assistant>".encode())
    assert resp.usage.prompt_tokens == len(prompt_ids)
    assert resp.choices[0].message.content == bytes(expected_continuation(prompt_ids, 12)).decode()


def test_models_and_health(oai, server):
    assert [m.id for m in oai.models.list().data] == [server.server.service.model.name or "specserve"]
    assert httpx.get(f"http://127.0.0.1:{server.server.http_port}/health").status_code == 200


BAD_BODIES = [
    ({"temperature": -1}, "temperature"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"n": 2}, "n"),
    ({"rule": "nope"}, "rule"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": "many"}, "max_tokens"),
    ({"drafters": ["no-such-drafter"]}, "drafters[0]"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ({"draft_length": -1}, "draft_length"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content"),
]


def test_bad_input_is_400_naming_the_field_while_a_good_request_completes(server):
    url = http_base(server) + "/chat/completions"
    good: dict = {}

    def run_good():
        good["r"] = httpx.post(url, json={"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 60,
                                          "rule": "greedy"}, timeout=30)

    t = threading.Thread(target=run_good)
    t.start()
    for patch, param in BAD_BODIES:
        body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 5} | patch
        r = httpx.post(url, json=body, timeout=30)
        assert r.status_code == 400, (patch, r.text)
        err = r.json()["error"]
        assert err["param"] == param and param.split("[")[0] in err["message"], (patch, err)
        assert err["type"] == "invalid_request_error" and "Traceback" not in r.text
    r = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400 and "error" in r.json()
    t.join(30)
    assert good["r"].status_code == 200 and good["r"].json()["usage"]["completion_tokens"] == 60


def test_over_the_concurrency_limit_is_429():
    with ServerThread(chat_service(verifier=FakeVerifier(delay=0.05), max_concurrent_requests=1),
                      http_port=free_port()) as s:
        url = http_base(s) + "/completions"
        with httpx.stream("POST", url, json={"prompt": PROMPT, "max_tokens": 60, "stream": True, "draft_length": 1},
                          timeout=30) as first:
            lines = first.iter_lines()  # kept: a dropped iterator closes the stream (a disconnect)
            assert next(lines).startswith("data: ")  # in flight now
            r = httpx.post(url, json={"prompt": PROMPT, "max_tokens": 2}, timeout=30)
            assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
            assert list(lines)[-2] == "data: [DONE]"  # the running request was not harmed


def test_a_client_that_disconnects_mid_stream_frees_its_request():
    service = chat_service(verifier=FakeVerifier(delay=0.05))
    with ServerThread(service, http_port=free_port()) as s:
        with httpx.stream("POST", http_base(s) + "/completions",
                          json={"prompt": PROMPT, "max_tokens": 200, "stream": True}, timeout=30) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            assert service._running == 1
        deadline = time.monotonic() + 10
        while service._running and time.monotonic() < deadline:
            time.sleep(0.05)
        assert service._running == 0  # cancelled: its session is gone, not decoding 200 tokens for nobody
        verifier_calls = service.loop.verifier.calls
        time.sleep(0.3)
        assert service.loop.verifier.calls == verifier_calls


# ---------------------------------------------------------------- API keys


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    key_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    key_file.write_text("# specserve keys\nkey-one\n\nkey-two\n")
    with ServerThread(chat_service(), http_port=free_port(), api_key_file=str(key_file)) as s:
        yield s


def test_http_keys(keyed):
    base = http_base(keyed)
    for key in ("key-one", "key-two"):
        ok = openai.OpenAI(base_url=base, api_key=key, max_retries=0).completions.create(
            model="m", prompt=PROMPT, max_tokens=3)
        assert ok.choices[0].text
    for key in ("wrong", "key-one-and-more", "key-on"):
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base, api_key=key, max_retries=0).completions.create(model="m", prompt=PROMPT,
                                                                                         max_tokens=3)
    r = httpx.post(base + "/completions", json={"prompt": PROMPT, "max_tokens": 3})  # no header at all
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = httpx.post(base + "/completions", content=b"garbage", headers={"authorization": "Bearer nope"})
    assert r.status_code == 401  # refused before the body is parsed
    assert httpx.get(f"http://127.0.0.1:{keyed.server.http_port}/health").status_code == 200  # probes stay open


def test_grpc_keys(keyed):
    with SpecServeClient(keyed.target, timeout=10) as anonymous, pytest.raises(SpecServeError) as err:
        anonymous.generate(PROMPT, max_new_tokens=3)
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
    with SpecServeClient(keyed.target, timeout=10, api_key="wrong") as c, pytest.raises(SpecServeError) as err:
        list(c.generate_stream(PROMPT, max_new_tokens=3))
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
    with SpecServeClient(keyed.target, timeout=10, api_key="key-two") as c:
        assert len(c.generate(PROMPT, max_new_tokens=3).token_ids) == 3
    with grpc.insecure_channel(keyed.target) as channel:  # health needs no key
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_keys_from_env_and_exposure_rules(tmp_path):
    keys = APIKeys.load(None, env={"SPECSERVE_API_KEY": "a, b"})
    assert len(keys) == 2 and keys.check("Bearer a") and keys.check("bearer b") and not keys.check("Bearer c")
    assert not keys.check("Basic a") and not keys.check(None) and APIKeys().check(None)
    with pytest.raises(ValueError, match="holds no key"):
        (tmp_path / "empty").write_text("# nothing\n")
        APIKeys.load(str(tmp_path / "empty"), env={})
    with pytest.raises(ValueError, match="without an API key"):
        check_exposure(APIKeys(), ["0.0.0.0"], allow_open=False)
    assert "open to anyone" in check_exposure(APIKeys(), ["127.0.0.1"], allow_open=False)
    assert "open to anyone" in check_exposure(APIKeys(), ["0.0.0.0"], allow_open=True)
    assert check_exposure(keys, ["0.0.0.0"], allow_open=False) is None
    with pytest.raises(ValueError, match="without an API key"):
        StandaloneServer(make_service(), ServerConfig(address="0.0.0.0"), keys=APIKeys())


# ---------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for localhost / 127.0.0.1, made here."""
    folder = tmp_path_factory.mktemp("tls")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


def test_tls_clients_work_and_plaintext_is_refused(certificate):
    cert, key = certificate
    with ServerThread(chat_service(), http_port=free_port(), tls_cert=cert, tls_key=key) as s:
        target = f"localhost:{s.port}"
        with SpecServeClient(target, timeout=10, tls_ca=cert) as c:
            assert len(c.generate(PROMPT, max_new_tokens=4).token_ids) == 4
        with SpecServeClient(target, timeout=3) as plain, pytest.raises(SpecServeError) as err:
            plain.generate(PROMPT, max_new_tokens=4)
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
        https = f"https://localhost:{s.server.http_port}/v1"
        tls_client = openai.OpenAI(base_url=https, api_key="x", max_retries=0,
                                   http_client=openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile=cert)))
        assert tls_client.completions.create(model="m", prompt=PROMPT, max_tokens=3).choices[0].text
        with pytest.raises(httpx.HTTPError):
            httpx.post(f"http://localhost:{s.server.http_port}/v1/completions", json={"prompt": PROMPT}, timeout=5)


def test_ray_router_checks_the_grpc_key_from_the_call_metadata():
    """The Ray app's Router (Serve's gRPC proxy hands it the call's metadata) refuses a missing or
    wrong key with UNAUTHENTICATED and lets a right one through."""
    from types import SimpleNamespace

    from specserve.serve.deployments import Router, _set_status, _unauthenticated

    cls = Router.func_or_class
    check = cls._authorized

    class Ctx:
        def __init__(self, metadata):
            self.metadata, self.code = metadata, None

        def invocation_metadata(self):
            return self.metadata

        def set_code(self, code):
            self.code = code

        def set_details(self, details):
            self.details = details

    keyed = SimpleNamespace(keys=APIKeys(["k"]))
    assert check(keyed, Ctx([("authorization", "Bearer k"), ("application", "specserve")]))
    assert not check(keyed, Ctx([("application", "specserve")]))
    assert not check(keyed, Ctx([("authorization", "Bearer nope")]))
    assert check(SimpleNamespace(keys=APIKeys()), Ctx([]))  # no key configured: open
    ctx = Ctx([])
    _set_status(ctx, _unauthenticated())
    assert ctx.code == grpc.StatusCode.UNAUTHENTICATED
