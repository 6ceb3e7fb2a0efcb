"""Shared pieces for the gRPC / client tests (no tests here): a byte-level tokenizer, deterministic
fake drafter/verifier backends for the real engine DecodeLoop, and a standalone server in a thread.

The fake "model" is greedy over a fixed rule: the next token after `ids` is a lowercase letter derived
from the last two ids, so every prompt has one known correct continuation (`expected_continuation`).
"""

from __future__ import annotations

import asyncio
import random
import socket
import threading

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from specserve.engine.loop import DecodeLoop
from specserve.engine.merge import accepted_by_drafter
from specserve.engine.workers import DraftCall, DraftReply, VerifyCall, VerifyReply
from specserve.serve.grpc_server import ServerConfig, StandaloneServer
from specserve.serve.service import GenerationService
from specserve.serve.validation import ModelInfo, RequestLimits
from specserve.tree.token_tree import ROOT, TokenTree

EOS = 256
VOCAB = 257


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """id == byte value, plus <eos> = 256 (a real transformers fast tokenizer, built in memory)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    vocab = {chars[b]: b for b in range(256)} | {"<eos>": EOS}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def true_next(ids) -> int:
    a = ids[-1]
    b = ids[-2] if len(ids) > 1 else 0
    return ord("a") + (a * 7 + b * 3 + 1) % 26


def expected_continuation(prompt_ids, n) -> list[int]:
    ids = list(prompt_ids)
    for _ in range(n):
        ids.append(true_next(ids))
    return ids[len(prompt_ids):]


class FakeVerifier:
    """Greedy exact-match verification against `true_next`, whatever the rule."""

    name = "verifier"

    def __init__(self, delay: float = 0.0, error: BaseException | None = None):
        self.delay, self.error = delay, error
        self.calls = 0

    async def verify(self, call: VerifyCall) -> VerifyReply:
        self.calls += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.error is not None:
            raise self.error
        ids, path, parent = list(call.committed), [], ROOT
        while True:
            want = true_next(ids)
            child = next((c for c in call.tree.children(parent) if call.tree.tokens[c] == want), None)
            if child is None:
                return VerifyReply(ids[len(call.committed):] + [want], path, accepted_by_drafter(call.tree, path))
            path.append(child)
            ids.append(want)
            parent = child


class FakeDrafter:
    """Proposes the true continuation but gets every `wrong_every`-th position wrong."""

    def __init__(self, name: str = "fake", wrong_every: int = 3, delay: float = 0.0):
        self.name, self.wrong_every, self.delay = name, wrong_every, delay

    async def draft(self, call: DraftCall) -> DraftReply:
        if self.delay:
            await asyncio.sleep(self.delay)
        ids, tokens = list(call.committed), []
        for i in range(call.num_tokens):
            tok = true_next(ids)
            if self.wrong_every and (len(call.committed) + i) % self.wrong_every == 0:
                tok = ord("A")  # never the true next token
            tokens.append(tok)
            ids.append(tok)
        tree = TokenTree()
        tree.add_sequence(tokens, None, drafter=self.name)
        return DraftReply(tree=tree, drafter=self.name)


def make_service(
    verifier=None, drafters=None, *, max_context=512, limits=None, max_concurrent_requests=64
) -> GenerationService:
    verifier = verifier or FakeVerifier()
    drafters = [FakeDrafter()] if drafters is None else drafters
    loop = DecodeLoop(verifier, drafters, dynamic_length=False)
    return GenerationService(
        loop,
        byte_tokenizer(),
        ModelInfo(vocab_size=VOCAB, max_context=max_context, drafters=tuple(d.name for d in drafters)),
        limits=limits or RequestLimits(default_rule="greedy", max_new_tokens=256),
        max_concurrent_requests=max_concurrent_requests,
    )


def free_port(low: int = 20000, high: int = 60000) -> int:
    for _ in range(200):
        port = random.randrange(low, high)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


class ServerThread:
    """A StandaloneServer on its own event loop in a daemon thread (tests use blocking clients)."""

    def __init__(self, service: GenerationService, **config):
        config.setdefault("port", free_port())
        self.config = ServerConfig(**config)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = StandaloneServer(service, self.config)
        self.port = self._run(self.server.start())
        self.target = f"127.0.0.1:{self.port}"

    def _run(self, coro, timeout=30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self):
        self._run(self.server.stop(0.5))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
