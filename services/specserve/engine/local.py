"""In-process backends for the decode loop (engine/workers.py protocols).

LocalDrafter wraps any models Drafter; LocalVerifier wraps a CausalLM and its per-session KV
caches and runs acceptance right next to the logits (sync -> score_tree -> process_logits ->
verify_tree -> commit), so only token ids leave it. Model work runs off the event loop (torch
releases the GIL), which keeps it free to stream and to time drafters out: on the CPU always on
the ONE compute thread of models/compute.py (a second torch thread slows every forward).
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import threading
import time
import zlib
from collections import deque

import numpy as np
import torch

from ..models.base import Drafter
from ..models.batched import score_trees
from ..models.causal_lm import CausalLM, SessionCache
from ..models.compute import executor_for, lane_busy, run_async
from ..sampling import ti_roots_lossy, verify_tree
from ..sampling.params import process_logits
from ..tree.token_tree import ROOT, TokenTree
from .goodput import CallDemand, PassPlanner
from .loop import TARGET_ROOT
from .merge import accepted_by_drafter, merge_trees
from .types import verification_rule
from .workers import (AheadCall, AheadReply, AheadUnitTree, DraftCall, DraftReply, VerifyCall, VerifyReply,
                      alternative_label, is_model_free)


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
        # LM drafters can end a chain at a token they doubt (DraftCall.min_confidence)
        self._confidence_kw = "min_confidence" in inspect.signature(drafter.propose).parameters
        # ... and name their runner-up token at each position (DraftCall.alternatives)
        self._alternatives_kw = "alternatives" in inspect.signature(drafter.propose).parameters
        self._tree_drafter = callable(getattr(drafter, "propose_tree", None))
        # an LM drafter can build the next round ahead, for several outcomes (engine/ahead.py)
        self.can_draft_ahead = callable(getattr(drafter, "propose_ahead", None))
        # where its work runs (models/compute.py): model-free drafters run no torch kernels, so
        # they take asyncio's thread pool and a hung one holds no core the verifier needs
        lm = getattr(drafter, "lm", None)
        self.device = "none" if is_model_free(drafter) else getattr(lm, "device", "cpu")
        self.lane = getattr(lm, "compute_lane", 0)
        self.model_free = is_model_free(drafter)  # drafts cost ~nothing (what exploration uses)

    def draft_sync(self, call: DraftCall) -> DraftReply:
        started = time.perf_counter()
        # a greedy chain draws nothing (~30 us a generator); roots and k-config trees may still sample
        needs_rng = not call.sampling.greedy or call.roots is not None or bool(call.tree_config)
        generator = generator_for(call.seed, f"drafter:{self.name}") if needs_rng else None
        extra = {"session_id": call.session_id} if self._session_kw else {}
        chain_extra = {**extra, "min_confidence": call.min_confidence} if self._confidence_kw else extra
        with self._lock:
            if call.roots is not None:  # mcsd-ti (LOSSY): one chain under each target root
                tree = TokenTree()
                for root in call.roots:
                    node = tree.propose(ROOT, root, None, TARGET_ROOT)
                    proposal = self.drafter.propose(
                        [*call.committed, root], call.num_tokens, call.sampling, generator, **chain_extra
                    )
                    tree.add_sequence(proposal.tokens[: call.num_tokens], proposal.probs, self.name, parent=node)
            elif call.tree_config:
                draft_tree = getattr(self.drafter, "draft_tree", None)
                if draft_tree is None:
                    raise TypeError(f"drafter {self.name} cannot draft k-config trees")
                tree = draft_tree(
                    call.committed, call.tree_config, call.sampling, call.coupling, generator, **extra
                )
                for proposals in tree.proposals.values():
                    for p in proposals:
                        p.drafter = p.drafter or self.name
            elif self._tree_drafter:  # drafters that speculate trees of their own (models/suffix.py)
                tree = self.drafter.propose_tree(call.committed, call.num_tokens, call.sampling, generator, **extra)
                for proposals in tree.proposals.values():
                    for p in proposals:
                        p.drafter = self.name  # credited under this backend's name, like chains
            else:
                if call.alternatives and self._alternatives_kw:
                    chain_extra = {**chain_extra, "alternatives": call.alternatives}
                proposal = self.drafter.propose(
                    call.committed, call.num_tokens, call.sampling, generator, **chain_extra
                )
                tree = TokenTree()
                chain = proposal.tokens[: call.num_tokens]
                nodes = tree.add_sequence(chain, proposal.probs, drafter=self.name)
                label = alternative_label(self.name)
                for i, token in enumerate((proposal.alternatives or [])[: len(chain)]):
                    tree.propose(nodes[i - 1] if i else ROOT, token, None, label)  # a leaf beside chain[i]
        return DraftReply(tree=tree, drafter=self.name, seconds=time.perf_counter() - started)

    async def draft(self, call: DraftCall) -> DraftReply:
        return await run_async(self.draft_sync, call, device=self.device, lane=self.lane)

    def draft_ahead_sync(self, call: AheadCall, cancelled: threading.Event | None = None) -> AheadReply:
        started = time.perf_counter()
        generator = generator_for(call.seed, f"ahead:{self.name}")
        extra = {"session_id": call.session_id} if self._session_kw else {}
        with self._lock:
            units = self.drafter.propose_ahead(call.committed, call.chain, call.fanout, call.num_tokens,
                                               call.sampling, generator, deadline_s=call.deadline_s,
                                               parents=call.parents or None,
                                               cancelled=cancelled.is_set if cancelled else None, **extra)
        out = []
        for unit in units:
            tree = TokenTree()
            tree.add_sequence(unit.proposal.tokens, unit.proposal.probs, drafter=self.name)
            out.append(AheadUnitTree(unit.accepted, unit.bonus, tree))
        return AheadReply(stamp=call.stamp, units=out, drafter=self.name, seconds=time.perf_counter() - started)

    async def draft_ahead(self, call: AheadCall) -> AheadReply:
        # cancelling the awaiting task does not stop a thread: the flag ends the build at its next
        # step, so the draft the round needs after a miss does not queue behind a useless build
        cancelled = threading.Event()
        try:
            return await run_async(self.draft_ahead_sync, call, cancelled, device=self.device, lane=self.lane)
        except asyncio.CancelledError:
            cancelled.set()
            raise


class LocalVerifier:
    """A CausalLM as a VerifierBackend, with a bounded LRU of per-session KV caches.

    Concurrent calls are batched (max_batch_size > 1): calls that arrive while a pass runs form
    the next pass, and `verify_batch_sync` scores all their trees in one forward
    (models/batched.py). Every clean pass is timed into `planner.costs`; a shared pass first gets the
    goodput-maximising depth cap of engine/goodput.py (`goodput_caps=False` turns that off)."""

    name = "verifier"

    def __init__(self, lm: CausalLM, max_sessions: int = 64, on_verified=None, max_batch_size: int = 1,
                 goodput_caps: bool = True) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self.lm = lm
        self.sessions = SessionCache(lm, max_sessions=max(max_sessions, max_batch_size))
        self._lock = threading.Lock()
        # optional observer (call, target_probs, verdict): e.g. collecting decision-model data
        self.on_verified = on_verified
        self.max_batch_size = max_batch_size
        self._batcher = (
            ContinuousBatcher(self.verify_batch_sync, max_batch_size, device=lm.device, lane=lm.compute_lane,
                              key=lambda call: call.session_id)
            if max_batch_size > 1 else None
        )
        # calls per SHARED pass (2 or more; passes that ran one call alone are not recorded)
        self.shared_pass_sizes: list[int] = []
        self.planner = PassPlanner()  # pass seconds by rows, and shared passes' caps (engine/goodput.py)
        self.goodput_caps = goodput_caps
        self.shared_pass_caps: list[int] = []  # the depth cap of each shared pass (-1 = none)

    def _timed_pass(self, sessions: list, rows: int, run):
        """Run one scoring pass and record its time by rows, unless it also prefilled (a prefill
        is not what a decode pass of that many rows costs)."""
        before = sum(s.forwards for s in sessions)
        started = time.perf_counter()
        out = run()
        if sum(s.forwards for s in sessions) - before == len(sessions):
            self.planner.costs.record(rows, time.perf_counter() - started)
        return out

    def _depth_cap(self, calls: list[VerifyCall]) -> int:
        """The shared pass's depth cap (-1 = none), from what each call's policy wants."""
        if not self.goodput_caps:
            return -1
        demands = []
        for call in calls:
            tree = call.tree
            depth = tree.max_depth if len(tree) else 0
            by_depth = [0] * depth
            for d in tree.depths:
                by_depth[d - 1] += 1
            for d in range(1, depth):
                by_depth[d] += by_depth[d - 1]
            want = call.want_depth if call.want_depth >= 0 else depth
            demands.append(CallDemand(want=want, rates=call.accept_rates, nodes_by_depth=by_depth,
                                      nodes_per_position=len(tree) / depth if depth else 1.0,
                                      draft_seconds=call.draft_seconds, catch_up_seconds=call.catch_up_seconds,
                                      catch_up_rounds=call.catch_up_rounds))
        return self.planner.depth_cap(demands)

    def verify_sync(self, call: VerifyCall) -> VerifyReply:
        started = time.perf_counter()
        with self._lock:
            session = self.sessions.get(call.session_id)
            session.sync(call.committed)  # a miss or a rollback re-prefills only what differs
            plain_step = len(call.tree) == 0 and call.rule != "mcsd-ti"
            # a verifier-only round is exactly a plain decoding step (one forward, no tree
            # mask, the pending token folded into any prefill), so it never costs more
            logits = self._timed_pass(
                [session], len(call.tree) + 1,
                (lambda: session.next_logits()[None]) if plain_step else (lambda: session.score_tree(call.tree)),
            )
            if call.rule == "mcsd-ti":
                return self._verify_ti(session, call, logits, process_logits(logits, call.sampling), started)
            return self._accept(session, call, logits, started, plain_step=plain_step)

    def verify_batch_sync(self, calls: list[VerifyCall]) -> list[VerifyReply | Exception]:
        """Verify several calls with ONE forward over all their trees. Returns a reply or the
        exception per call: a bad call fails alone, the others are still answered. mcsd-ti calls
        and repeats of a session already in the batch are verified one by one after it."""
        results: list[VerifyReply | Exception | None] = [None] * len(calls)
        batched: list[int] = []
        alone: list[int] = []
        seen: set[str] = set()
        for i, call in enumerate(calls):
            if call.rule == "mcsd-ti" or call.session_id in seen:
                alone.append(i)
            else:
                seen.add(call.session_id)
                batched.append(i)
        if len(batched) == 1:
            alone, batched = sorted(alone + batched), []
        if self.goodput_caps:
            self.planner.saw([calls[i].session_id for i in batched or alone])
        cap, told, explore = -1, -1, False
        if batched:
            started = time.perf_counter()
            cap = self._depth_cap([calls[i] for i in batched])
            explore = self.goodput_caps and self.planner.explored
            told = self.planner.last_cap if self.goodput_caps and cap >= 0 else cap
            if cap >= 0:  # cutting a draft is lossless: the verifier just sees fewer candidates
                calls = list(calls)
                for i in batched:
                    if len(calls[i].tree) and calls[i].tree.max_depth > cap:
                        calls[i] = dataclasses.replace(calls[i], tree=merge_trees([calls[i].tree], max_depth=cap))
            try:
                with self._lock:
                    sessions = []
                    for i in batched:
                        session = self.sessions.get(calls[i].session_id)
                        session.sync(calls[i].committed)
                        sessions.append(session)
                    trees = [calls[i].tree for i in batched]
                    rows = len(batched) * (1 + max(len(t) for t in trees))  # padded to the longest feed
                    all_logits = self._timed_pass(sessions, rows, lambda: score_trees(sessions, trees))
                    self.shared_pass_sizes.append(len(batched))
                    self.shared_pass_caps.append(cap)
                    for i, session, logits in zip(batched, sessions, all_logits):
                        try:
                            results[i] = self._accept(session, calls[i], logits, started, plain_step=False)
                        except Exception as exc:  # noqa: BLE001 - this call's error, returned to it
                            session.sync(calls[i].committed)  # nothing of this round is kept
                            results[i] = exc
            except Exception:  # noqa: BLE001 - the pass itself failed: isolate the culprit
                alone = sorted(alone + [i for i in batched if results[i] is None])
            if self.goodput_caps:  # what the pass realised, for the planner's goodput audit
                self.planner.passed(started, [calls[i].session_id for i in batched],
                                    opened=any(len(calls[i].tree) for i in batched),
                                    tokens=sum(len(r.tokens) for r in results if isinstance(r, VerifyReply)))
        for i in alone:
            lone_cap = -1
            if self.goodput_caps and i not in batched and calls[i].rule != "mcsd-ti":
                lone_cap = self.planner.lone_cap(calls[i].session_id, calls[i].catch_up_seconds)  # others active
                if lone_cap >= 0 and len(calls[i].tree) and calls[i].tree.max_depth > lone_cap:
                    calls = list(calls)
                    calls[i] = dataclasses.replace(calls[i], tree=merge_trees([calls[i].tree], max_depth=lone_cap))
            try:
                if self.goodput_caps:  # a lone pass breaks the chain of shared passes the audit times
                    self.planner.passed(time.perf_counter(), [calls[i].session_id], bool(len(calls[i].tree)), 0)
                results[i] = self.verify_sync(calls[i])
                results[i].depth_cap = lone_cap
            except Exception as exc:  # noqa: BLE001 - this call's error, returned to it
                results[i] = exc
        for i in batched:  # their trees were cut to the cap (also when re-verified alone)
            if isinstance(results[i], VerifyReply):
                results[i].depth_cap, results[i].explore = told, explore
        return results  # type: ignore[return-value]

    def _accept(self, session, call: VerifyCall, logits, started: float, plain_step: bool) -> VerifyReply:
        """Acceptance next to the logits, then keep the accepted path in the session's cache."""
        # the greedy rule reads only each row's argmax (sampling/tree_verify.py), which temperature,
        # top-k and top-p keep: the raw logits will do, without vocabulary-sized processed rows
        # (so does every lossless rule at temperature 0: engine/types.py verification_rule)
        rule = verification_rule(call.rule, call.sampling.greedy)
        greedy_rows = rule == "greedy" and self.on_verified is None
        target_probs = logits if greedy_rows else process_logits(logits, call.sampling)
        verdict = verify_tree(
            call.tree,
            target_probs,
            rule,
            call.rule_params,
            None if greedy_rows else generator_for(call.seed, "verifier"),
        )
        if plain_step:
            session.append(verdict.tokens[-1])
        else:
            session.commit(verdict.path, call.tree, verdict.tokens[-1])
        if self.on_verified is not None:
            self.on_verified(call, target_probs, verdict)
        return VerifyReply(
            tokens=list(verdict.tokens),
            path=list(verdict.path),
            accepted_by_drafter=accepted_by_drafter(call.tree, verdict.path),
            seconds=time.perf_counter() - started,
        )

    def _verify_ti(self, session, call: VerifyCall, logits, target_probs, started: float) -> VerifyReply:
        """Improved MCSD (LOSSY): keep the longest-accepted branch, emit its root unverified plus
        its accepted run (no correction token), and draw the next round's roots from the law at
        the end of the kept path. An empty tree (the first round) only draws roots."""
        generator = generator_for(call.seed, "verifier")
        tree = call.tree
        path: list[int] = []
        tokens: list[int] = []
        root_law = target_probs[0]
        if len(tree):
            verdict = verify_tree(tree, target_probs, "mcsd-ti", call.rule_params, generator)
            # the kept root + its accepted run; verify_tree's extra token (one draw from the
            # next-root law) is not emitted: the next round's roots are drawn from that law here
            path = list(verdict.path)
            tokens = [tree.tokens[n] for n in path]
            root_law = verdict.next_root_probs
            session.commit(path[:-1], tree, tokens[-1])  # the last kept token becomes pending
        width = max(call.ti_width, 1)
        if call.sampling.greedy:  # top-w of the verifier's own row (the processed row is one-hot)
            row = logits[path[-1] + 1 if path else 0]
            next_roots = torch.topk(row, min(width, row.shape[-1])).indices.tolist()
        else:
            next_roots = ti_roots_lossy(root_law, width, generator)
        credited = accepted_by_drafter(tree, path)
        credited.pop(TARGET_ROOT, None)
        return VerifyReply(
            tokens=tokens,
            path=path,
            accepted_by_drafter=credited,
            seconds=time.perf_counter() - started,
            next_roots=next_roots,
        )

    async def verify(self, call: VerifyCall) -> VerifyReply:
        if self._batcher is None:
            return await run_async(self.verify_sync, call, device=self.lm.device, lane=self.lm.compute_lane)
        return await self._batcher.submit(call)

    def end_session(self, session_id: str) -> None:
        self.sessions.drop(session_id)


BUSY_POLL_S = 0.002  # how often a batch waiting on a busy compute thread looks whether it went idle


class ContinuousBatcher:
    """Collects concurrent async calls for a synchronous batch function: the first call runs at
    once; calls that arrive while a batch runs (in a worker thread) form the next batch, up to
    `max_batch_size`. A lone request never waits for company.

    Regrouping (`key` given, e.g. the session id): streams that alternate (A's pass runs while B
    queues, then B's while A drafts, ...) would never share a pass again, because each one's next
    call arrives just after the other's pass started. So before a batch is formed, the callers of
    the last two batches that are not queued yet are waited for, at most `wait_fraction` of the
    last batch's time (and `max_wait_s`): they are drafting their next round and about to call.
    While the batch's own compute thread is busy (CPU: other streams' LM drafts queued on it), the
    wait is free, since the batch would run after that work anyway, and it goes on until the
    thread is idle: else the streams whose drafts ran last miss the pass and get passes of their
    own, and at 4 streams with one LM drafter a pass carried 1-2 calls instead of 4.

    `run_batch(items) -> results` returns one result per item, an Exception for a failed item."""

    def __init__(self, run_batch, max_batch_size: int, device=None, lane: int = 0, key=None,
                 wait_fraction: float = 0.25, max_wait_s: float = 0.05) -> None:
        self.run_batch = run_batch
        self.device = device  # where the batch function's work runs (models/compute.py)
        self.lane = lane
        self.max_batch_size = max_batch_size
        self.key = key
        self.wait_fraction = wait_fraction
        self.max_wait_s = max_wait_s
        self._queue: list[tuple[object, asyncio.Future]] = []
        self._draining = False
        self._recent: deque = deque(maxlen=2)  # the keys of the last batches
        self._last_seconds = 0.0
        self._arrived: asyncio.Event | None = None
        self.regroup_waits = 0  # batches that waited for company (for tests and stats)

    async def _regroup(self) -> None:
        if self.key is None or not self._recent:
            return
        expected = set().union(*self._recent)
        loop = asyncio.get_running_loop()
        grace = min(self.max_wait_s, self.wait_fraction * self._last_seconds)
        deadline = loop.time() + grace
        waited = False
        while True:
            queued = {self.key(item) for item, future in self._queue if not future.done()}
            if expected <= queued or len(queued) >= self.max_batch_size:
                break
            busy = self._thread_busy()
            if busy:  # waiting costs nothing yet: the grace counts from when the thread is idle
                deadline = loop.time() + grace
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            waited = True
            self._arrived = asyncio.Event()
            try:  # while busy, look again soon: the thread going idle sets no event
                await asyncio.wait_for(self._arrived.wait(), min(remaining, BUSY_POLL_S) if busy else remaining)
            except asyncio.TimeoutError:
                pass
        self.regroup_waits += int(waited)

    def _thread_busy(self) -> bool:
        """The compute thread this batcher's batches run on has work queued or running."""
        return executor_for(self.device, self.lane) is not None and lane_busy(self.lane)

    async def submit(self, item):
        future = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if self._arrived is not None:
            self._arrived.set()
        if not self._draining:
            self._draining = True
            asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self._queue:
                await self._regroup()
                batch = self._queue[: self.max_batch_size]
                del self._queue[: self.max_batch_size]
                batch = [(item, future) for item, future in batch if not future.done()]  # skip cancelled
                if not batch:
                    continue
                started = time.perf_counter()
                try:
                    results = await run_async(self.run_batch, [item for item, _ in batch], device=self.device,
                                              lane=self.lane)
                except Exception as exc:  # noqa: BLE001 - delivered to every caller of the batch
                    results = [exc] * len(batch)
                self._last_seconds = time.perf_counter() - started
                if self.key is not None:
                    self._recent.append({self.key(item) for item, _ in batch})
                for (_, future), result in zip(batch, results):
                    if future.done():
                        continue
                    if isinstance(result, Exception):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
        finally:
            self._draining = False
