"""The serving side of the `specserve` command line, plugged into cli.py by `add_commands(subparsers)`.

    specserve serve --standalone [--address 127.0.0.1] [--port 50051] [--metrics-port 9400]
                    [--verifier smollm2-135m] [--drafter ngram --drafter prompt-lookup] [--dtype auto]
    specserve serve [--config deploy/local.yaml] [--ray-address ADDR]      # Ray Serve (serve/app.py)
    specserve generate "prompt" --server HOST:PORT [sampling/rule options]  # a running server

`add_commands` adds `serve`, and `--server` to an existing `generate` parser; cli.py's generate handler
calls `generate_remote(args)` when `args.server` is set. Also runnable without cli.py:
`python -m specserve.serve.cli_commands serve --standalone ...`.
"""

from __future__ import annotations

import argparse
import os
import asyncio
import sys
import time
from pathlib import Path

import yaml


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve the gRPC API (standalone grpc.aio server, or the Ray Serve application)",
        description="Serve specserve.v1.Generation. --standalone runs everything in this process "
        "(no Ray); without it the Ray Serve application in --config is deployed.",
    )
    p.add_argument("--standalone", action="store_true", help="one process, no Ray")
    p.add_argument("--address", default=None, help="bind address of the standalone server (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="gRPC port of the standalone server (default 50051)")
    p.add_argument("--metrics-port", type=int, default=None, help="Prometheus /metrics HTTP port (standalone)")
    p.add_argument("--verifier", default=None, help="verifier model: alias, local path or hub id (standalone)")
    p.add_argument(
        "--drafter", action="append", default=None,
        help='drafter (repeatable): "ngram", "prompt-lookup", "suffix", "early-exit:N", a model sharing the tokenizer, MODEL@int8',
    )
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default=None)
    p.add_argument("--max-concurrent", type=int, default=None, help="requests served at once; more get RESOURCE_EXHAUSTED")
    p.add_argument(
        "--config", default=None,
        help="standalone: a YAML ServerConfig (serve/grpc_server.py); Ray: a Serve config (default deploy/local.yaml)",
    )
    p.add_argument("--http-port", type=int, default=None,
                   help="standalone: also serve the OpenAI-compatible HTTP API on this port (same process, same decode loop)")
    p.add_argument("--api-key-file", default=None,
                   help="API keys, one per line (also env SPECSERVE_API_KEY); clients send 'Authorization: Bearer KEY'")
    p.add_argument("--allow-unauthenticated", action="store_true",
                   help="standalone: listen on a non-loopback address without an API key")
    p.add_argument("--tls-cert", default=None, help="standalone: PEM certificate for gRPC TLS and HTTPS")
    p.add_argument("--tls-key", default=None, help="standalone: PEM private key of --tls-cert")
    p.add_argument("--ray-address", default=None, help="Ray cluster to deploy on (default: start a local one)")
    p.set_defaults(func=run_serve)

    generate = subparsers.choices.get("generate")
    if generate is not None:
        add_server_option(generate)


def add_server_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--server", metavar="HOST:PORT", default=None,
        help="send the request to a running specserve server instead of loading models here",
    )
    parser.add_argument("--api-key", default=None, help="with --server: the API key (default: env SPECSERVE_API_KEY)")
    parser.add_argument("--tls-ca", default=None, help="with --server: PEM CA certificate; turns on TLS")


def standalone_config(args: argparse.Namespace):
    """ServerConfig from --config (YAML) with command-line flags on top."""
    from .grpc_server import ServerConfig

    data = ServerConfig.model_validate(yaml.safe_load(Path(args.config).read_text()) if args.config else {}).model_dump()
    flag = lambda name: getattr(args, name, None)  # noqa: E731 - flags a caller's Namespace may lack
    for key, value in (("address", args.address), ("port", args.port), ("metrics_port", args.metrics_port),
                       ("max_concurrent_requests", args.max_concurrent), ("http_port", flag("http_port")),
                       ("api_key_file", flag("api_key_file")), ("tls_cert", flag("tls_cert")),
                       ("tls_key", flag("tls_key")), ("allow_unauthenticated", flag("allow_unauthenticated") or None)):
        if value is not None:
            data[key] = value
    for key, value in (("verifier", args.verifier), ("drafters", args.drafter), ("dtype", args.dtype)):
        if value is not None:
            data["models"][key] = value
    return ServerConfig.model_validate(data)  # validated again, flags included


def run_serve(args: argparse.Namespace) -> int:
    if args.standalone:
        from .grpc_server import serve_standalone

        asyncio.run(serve_standalone(standalone_config(args)))
        return 0
    standalone_only = [f for f in ("address", "port", "metrics_port", "verifier", "drafter", "dtype", "max_concurrent",
                                   "http_port", "api_key_file", "tls_cert", "tls_key")
                       if getattr(args, f) is not None]
    if args.allow_unauthenticated:
        standalone_only.append("allow_unauthenticated")
    if standalone_only:
        raise SystemExit(
            f"specserve serve: --{standalone_only[0].replace('_', '-')} applies to --standalone only; "
            "the Ray application takes its settings from --config"
        )
    from .app import run_local

    run_local(args.config or "deploy/local.yaml", address=args.ray_address, blocking=True)
    return 0


def _request_from_args(args: argparse.Namespace):
    from ..client import build_request

    tree = getattr(args, "tree", None)
    if isinstance(tree, str):
        tree = [int(k) for k in tree.split(",") if k]
    return build_request(
        args.prompt,
        chat=not getattr(args, "no_chat", False),
        temperature=getattr(args, "temperature", None),
        top_k=getattr(args, "top_k", None),
        top_p=getattr(args, "top_p", None),
        rule=getattr(args, "rule", None) or "",
        delta=getattr(args, "delta", None),
        tas_epsilon=getattr(args, "tas_epsilon", None),
        tas_alpha=getattr(args, "tas_alpha", None),
        # --drafter given explicitly selects among the server's drafters (standalone names them by spec)
        drafters=getattr(args, "drafter", None) or (),
        draft_length=getattr(args, "draft_length", None),
        tree=tree or (),
        max_new_tokens=getattr(args, "max_new_tokens", None),
        seed=getattr(args, "seed", None),
    )


def summary_line(stats, seconds: float) -> str:
    drafters = ", ".join(f"{name} {d.acceptance_rate:.0%}" for name, d in sorted(stats.drafters.items())) or "none"
    return (
        f"[{stats.generated_tokens} tokens in {seconds:.2f} s, {stats.generated_tokens / seconds if seconds else 0:.1f} tok/s; "
        f"{stats.tokens_per_step:.2f} tokens per verifier step; mean accepted length {stats.mean_accepted_length:.2f}; "
        f"acceptance per drafter: {drafters}; rule {stats.rule}{' (lossy)' if stats.lossy else ''}]"
    )


def generate_remote(args: argparse.Namespace, out=None) -> int:
    """`specserve generate --server HOST:PORT`: stream the text, then one summary line (stderr)."""
    from ..client import SpecServeClient, SpecServeError

    out = out or sys.stdout
    started = time.perf_counter()
    try:
        api_key = getattr(args, "api_key", None) or os.environ.get("SPECSERVE_API_KEY", "").split(",")[0] or None
        with SpecServeClient(args.server, timeout=getattr(args, "timeout", None), api_key=api_key,
                             tls_ca=getattr(args, "tls_ca", None)) as client:
            for chunk in client.generate_stream(_request_from_args(args)):
                out.write(chunk.text)
                out.flush()
                if chunk.HasField("stats"):
                    out.write("\n")
                    print(summary_line(chunk.stats, time.perf_counter() - started), file=sys.stderr)
    except SpecServeError as e:
        print(f"specserve generate: server {args.server}: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point without cli.py (`python -m specserve.serve.cli_commands ...`)."""
    parser = argparse.ArgumentParser(prog="specserve")
    sub = parser.add_subparsers(dest="command", required=True)
    generate = sub.add_parser("generate", help="generate on a running server")
    generate.add_argument("prompt")
    for flag, kind in (("--temperature", float), ("--top-k", int), ("--top-p", float), ("--delta", float),
                       ("--tas-epsilon", float), ("--max-new-tokens", int), ("--draft-length", int), ("--seed", int)):
        generate.add_argument(flag, type=kind)
    generate.add_argument("--rule")
    generate.add_argument("--tree")
    generate.add_argument("--no-chat", action="store_true")
    generate.set_defaults(func=lambda a: generate_remote(a) if a.server else parser.error("generate needs --server"))
    add_commands(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
