"""In-process backends for the decode loop (engine/workers.py protocols).

LocalDrafter wraps any models Drafter; LocalVerifier wraps a CausalLM and its per-session KV
caches and runs acceptance right next to the logits (sync -> score_tree -> process_logits ->
verify_tree -> commit), so only token ids leave it. Model work runs in a worker thread
(torch releases the GIL), which keeps the event loop free to stream and to time drafters out.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
import zlib

import numpy as np
import torch

from ..models.base import Drafter
from ..models.causal_lm import CausalLM, SessionCache
from ..sampling.params import process_logits
from ..tree.token_tree import TokenTree
from .merge import accepted_by_drafter
from .workers import DraftCall, DraftReply, VerifyCall, VerifyReply


def generator_for(seed: int, stream: str) -> torch.Generator:
    """An independent torch RNG stream per (round seed, role), e.g. one per drafter name."""
    mixed = np.random.SeedSequence([seed & 0xFFFFFFFFFFFFFFFF, zlib.crc32(stream.encode())])
    return torch.Generator().manual_seed(int(mixed.generate_state(1, np.uint64)[0] >> 1))


class LocalDrafter:
    """A models Drafter as a DrafterBackend. Chains come from `propose`; k-config trees
    (DraftCall.tree_config) from the drafter's `draft_tree`, sampled with the rule's coupling."""

    def __init__(self, drafter: Drafter, name: str | None = None) -> None:
        self.drafter = drafter
        self.name = name or drafter.name
        self._lock = threading.Lock()  # a timed-out call may still run: never two at once
        # drafters with per-session caches take the session id (keeps concurrent requests apart)
        self._session_kw = "session_id" in inspect.signature(drafter.propose).parameters

    def draft_sync(self, call: DraftCall) -> DraftReply:
        started = time.perf_counter()
        generator = generator_for(call.seed, f"drafter:{self.name}")
        extra = {"session_id": call.session_id} if self._session_kw else {}
        with self._lock:
            if call.tree_config:
                draft_tree = getattr(self.drafter, "draft_tree", None)
                if draft_tree is None:
                    raise TypeError(f"drafter {self.name} cannot draft k-config trees")
                tree = draft_tree(
                    call.committed, call.tree_config, call.sampling, call.coupling, generator, **extra
                )
                for proposals in tree.proposals.values():
                    for p in proposals:
                        p.drafter = p.drafter or self.name
            else:
                proposal = self.drafter.propose(
                    call.committed, call.num_tokens, call.sampling, generator, **extra
                )
                tree = TokenTree()
                tree.add_sequence(proposal.tokens[: call.num_tokens], proposal.probs, drafter=self.name)
        return DraftReply(tree=tree, drafter=self.name, seconds=time.perf_counter() - started)

    async def draft(self, call: DraftCall) -> DraftReply:
        return await asyncio.to_thread(self.draft_sync, call)


class LocalVerifier:
    """A CausalLM as a VerifierBackend, with a bounded LRU of per-session KV caches."""

    name = "verifier"

    def __init__(self, lm: CausalLM, max_sessions: int = 64) -> None:
        self.lm = lm
        self.sessions = SessionCache(lm, max_sessions=max_sessions)
        self._lock = threading.Lock()

    def verify_sync(self, call: VerifyCall) -> VerifyReply:
        from ..sampling import verify_tree

        started = time.perf_counter()
        with self._lock:
            session = self.sessions.get(call.session_id)
            session.sync(call.committed)  # a miss or a rollback re-prefills only what differs
            logits = session.score_tree(call.tree)
            target_probs = process_logits(logits, call.sampling)
            verdict = verify_tree(
                call.tree,
                target_probs,
                call.rule,
                call.rule_params,
                generator_for(call.seed, "verifier"),
            )
            session.commit(verdict.path, call.tree, verdict.tokens[-1])
        return VerifyReply(
            tokens=list(verdict.tokens),
            path=list(verdict.path),
            accepted_by_drafter=accepted_by_drafter(call.tree, verdict.path),
            seconds=time.perf_counter() - started,
        )

    async def verify(self, call: VerifyCall) -> VerifyReply:
        return await asyncio.to_thread(self.verify_sync, call)

    def end_session(self, session_id: str) -> None:
        self.sessions.drop(session_id)
