"""client/ and serve/cli_commands.py against a real loopback server (fake backends), plus one slow
test of `specserve serve --standalone` on the embedded default model in a subprocess."""

import argparse
import asyncio
import io
import os
import signal
import subprocess
import sys
import time

import grpc
import pydantic
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from specserve.client import AsyncSpecServeClient, SpecServeClient, SpecServeError, build_request
from specserve.serve import cli_commands
from test_grpc_support import ServerThread, expected_continuation, free_port, make_service


@pytest.fixture(scope="module")
def server():
    with ServerThread(make_service()) as s:
        yield s


def test_build_request_sets_only_what_was_given():
    req = build_request("hi", temperature=0.0, max_new_tokens=7, tree=[2, 1], drafters=["ngram"], stop=["\n"])
    assert req.text == "hi" and req.sampling.HasField("temperature") and req.sampling.temperature == 0.0
    assert not req.sampling.HasField("top_p") and not req.HasField("seed") and not req.rule_params.HasField("delta")
    assert req.max_new_tokens == 7 and list(req.tree.branching) == [2, 1] and list(req.drafters) == ["ngram"]
    ids = build_request([1, 2, 3], seed=5, delta=0.25, rule="cactus")
    assert ids.WhichOneof("prompt") == "token_ids" and list(ids.token_ids.ids) == [1, 2, 3]
    assert ids.seed == 5 and ids.rule_params.delta == 0.25 and ids.rule == "cactus"


def test_async_client_streams_and_reports_errors(server):
    prompt = "async prompt"
    want = expected_continuation(list(prompt.encode()), 16)

    async def main():
        async with AsyncSpecServeClient(server.target, timeout=30) as client:
            ids = [t async for chunk in client.generate_stream(prompt, max_new_tokens=16) for t in chunk.token_ids]
            reply = await client.generate(prompt, max_new_tokens=16)
            with pytest.raises(SpecServeError) as err:
                await client.generate(prompt, top_p=2.0)
            return ids, reply, err.value

    ids, reply, error = asyncio.run(main())
    assert ids == want and list(reply.token_ids) == want
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.details.startswith("sampling.top_p:")


def test_sync_client_stops_early_without_leaking_the_request(server):
    with SpecServeClient(server.target, timeout=30) as client:
        stream = client.generate_stream("early stop", max_new_tokens=200)
        next(stream)
        stream.close()  # cancels the RPC
        reply = client.generate("after", max_new_tokens=4)
        assert list(reply.token_ids) == expected_continuation(list(b"after"), 4)
    deadline = time.monotonic() + 10
    while server.server.service._running:  # the cancelled request left the engine loop
        assert time.monotonic() < deadline, "cancelled request still running"
        time.sleep(0.05)


def test_generate_with_server_flag(server, capsys):
    out = io.StringIO()
    prompt = "cli prompt"
    rc = cli_commands.main(["generate", prompt, "--server", server.target, "--max-new-tokens", "12",
                            "--no-chat", "--rule", "greedy", "--draft-length", "3"])
    assert rc == 0
    captured = capsys.readouterr()
    assert captured.out == bytes(expected_continuation(list(prompt.encode()), 12)).decode() + "\n"
    assert "tokens per verifier step" in captured.err and "fake" in captured.err
    rc = cli_commands.generate_remote(
        argparse.Namespace(prompt=prompt, server=server.target, rule="nope", no_chat=True), out=out
    )
    assert rc == 1 and "INVALID_ARGUMENT: rule:" in capsys.readouterr().err


def test_add_commands_extends_an_existing_generate_parser():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("generate").add_argument("prompt")
    cli_commands.add_commands(sub)
    assert parser.parse_args(["generate", "x", "--server", "h:1"]).server == "h:1"
    args = parser.parse_args(["serve", "--standalone", "--port", "20001", "--drafter", "ngram", "--dtype", "float32"])
    assert args.func is cli_commands.run_serve
    config = cli_commands.standalone_config(args)
    assert config.port == 20001 and config.models.drafters == ["ngram"] and config.models.dtype == "float32"
    assert config.models.verifier == "smollm2-135m"  # untouched defaults survive
    with pytest.raises(pydantic.ValidationError):
        cli_commands.standalone_config(parser.parse_args(["serve", "--standalone", "--port", "70000"]))


def test_standalone_config_file(tmp_path):
    path = tmp_path / "server.yaml"
    path.write_text("port: 20002\nlimits:\n  max_new_tokens: 256\nmodels:\n  drafters: [prompt-lookup]\n")
    args = argparse.Namespace(config=str(path), address=None, port=None, metrics_port=20003, max_concurrent=None,
                              verifier=None, drafter=None, dtype=None)
    config = cli_commands.standalone_config(args)
    assert (config.port, config.metrics_port, config.limits.max_new_tokens) == (20002, 20003, 256)
    assert config.models.drafters == ["prompt-lookup"]


@pytest.mark.slow
def test_specserve_serve_standalone_on_the_embedded_model():
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "specserve.serve.cli_commands", "serve", "--standalone", "--port", str(port),
         "--dtype", "float32"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    try:
        target = f"127.0.0.1:{port}"
        deadline = time.monotonic() + 240  # first run dequantizes the GGUF once (cached afterwards)
        with grpc.insecure_channel(target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                assert proc.poll() is None, proc.stdout.read()
                try:
                    status = health.Check(health_pb2.HealthCheckRequest(service="specserve.v1.Generation"), timeout=2)
                    if status.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                assert time.monotonic() < deadline, "server did not become healthy"
                time.sleep(1)
        with SpecServeClient(target, timeout=120) as client:
            reply = client.generate("What is the capital of France?", chat=True, max_new_tokens=8, rule="greedy")
        assert len(reply.token_ids) >= 1 and reply.text.strip()
        assert reply.stats.rounds >= 1 and reply.stats.generated_tokens == len(reply.token_ids)
        print(f"\nSmolLM2 over gRPC: {reply.text!r}; {reply.stats.tokens_per_step:.2f} tokens/step")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0  # graceful shutdown exits cleanly


def test_specserve_generate_server_through_the_real_cli(server, capsys):
    from specserve import cli

    prompt = "real cli"
    rc = cli.main(["generate", prompt, "--server", server.target, "--no-chat", "--max-new-tokens", "9",
                   "--rule", "greedy", "--temperature", "0", "--draft-length", "2"])
    assert rc == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(bytes(expected_continuation(list(prompt.encode()), 9)).decode())
    assert "tokens per verifier step" in captured.err
