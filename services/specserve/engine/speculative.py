"""A synchronous front for the decode loop: for the CLI, tests and benchmarks.

    engine = SpeculativeEngine(LocalVerifier(lm), [LocalDrafter(MaxGramDrafter())])
    tokens, stats = engine.run(GenerationRequest(prompt_ids=ids, max_new_tokens=64))
    for round_result in engine.generate(request): ...   # streams round by round
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import Iterator, Sequence

from .loop import DecodeLoop
from .types import GenerationRequest, GenerationStats, RoundResult
from .workers import DrafterBackend, VerifierBackend


class SpeculativeEngine:
    def __init__(
        self,
        verifier: VerifierBackend,
        drafters: Sequence[DrafterBackend] = (),
        **loop_options,
    ) -> None:
        self.loop = DecodeLoop(verifier, drafters, **loop_options)

    def generate(
        self, request: GenerationRequest, stats: GenerationStats | None = None
    ) -> Iterator[RoundResult]:
        """Yield each round's result as soon as it is committed (drives the async loop)."""
        if not request.session_id:  # known here, so the verifier's cache can be freed at the end
            request = dataclasses.replace(request, session_id=uuid.uuid4().hex)
        event_loop = asyncio.new_event_loop()
        rounds = self.loop.rounds(request, stats)
        try:
            while True:
                try:
                    yield event_loop.run_until_complete(rounds.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            event_loop.run_until_complete(rounds.aclose())
            event_loop.close()
            end_session = getattr(self.loop.verifier, "end_session", None)
            if end_session is not None:
                end_session(request.session_id)

    def run(self, request: GenerationRequest) -> tuple[list[int], GenerationStats]:
        """All new tokens and the run's statistics."""
        stats = GenerationStats()
        tokens: list[int] = []
        for result in self.generate(request, stats):
            tokens.extend(result.tokens)
        return tokens, stats
