"""The decode loop: draft -> merge into one tree -> one verifier pass -> accept -> commit.

ONE loop for every deployment: it talks to drafters and to the verifier only through the
message-passing backends of engine/workers.py, so the same code runs in one process (local
backends, engine/local.py) and in the Ray Serve router (remote backends).

Fault tolerance lives here: a drafter that raises or misses its deadline is dropped for the
round and the round goes on with the others; with no drafter left it is a verifier-only
round (plain decoding, one token). Drafters change speed, never the output.

Drafting ahead (`ahead=`, for drafters on their own devices): while the verifier checks a round,
a strategy of engine/ahead.py drafts the next one (the full-acceptance bet of
`overlap_drafting=True`, or enumerate-and-select); the loop only starts it, takes what it has when
the reply is in, and drafts as usual otherwise. Only the timing changes, never the output law.

Under load the verifier caps the draft depth of each shared pass (engine/goodput.py); the loop
tells it what its policy wants and drafts no deeper than the last cap. LM drafters that would
first re-read unseen text (a new request's prompt) join only after a cap that weighed it, and
never for a re-read that the tokens left to generate cannot pay back.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence

import numpy as np

from ..cascade.draft_length import DraftLengthPolicy, TieredLengthPolicy
from ..sampling import coupling_for_rule
from ..tree.token_tree import ROOT, Coupling, TokenTree
from .ahead import AheadContext, DraftingAhead, make_strategy
from .goodput import CatchUpCost, rounds_left, shadow_accepted
from .merge import drafted_by_drafter, merge_trees
from .types import DEFAULT_MIN_DRAFT_CONFIDENCE, GenerationRequest, GenerationStats, RoundResult, verification_rule
from .workers import (DraftCall, DraftReply, DrafterBackend, VerifierBackend, VerifyCall, is_alternative_label,
                      is_model_free)

log = logging.getLogger(__name__)

TARGET_ROOT = "target"  # drafter label of mcsd-ti roots (drawn from the verifier, never verified)


def round_seed(seed: int, round_index: int) -> int:
    """A well-mixed 63-bit seed for (request seed, round); numpy's SeedSequence does the hashing,
    so retried or re-routed calls of the same round draw the same numbers."""
    state = np.random.SeedSequence([seed & 0xFFFFFFFFFFFFFFFF, round_index]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


class DecodeLoop:
    """Speculative decoding over any drafter/verifier backends.

    draft_timeout_s: a drafter's deadline per round (None = wait for it).
    dynamic_length: choose each round's depth with cascade/draft_length.py (request.draft_length
    is then the maximum); False drafts exactly request.draft_length every round.
    overlap_drafting: draft the next round while the verifier checks this one (module doc); it
    pays when drafters and verifier run on different devices, not when they share CPU cores.
    min_draft_confidence: LM drafters end a chain after a token they gave less than this
    (DraftCall.min_confidence; lengths only, so lossless), and the draft-length policy lets depth
    grow past position 1's rate (cascade/draft_length.py, deep_prior_floor). 0 = off; off too
    without the dynamic length (a fixed length drafts exactly that).
    greedy_alternatives: under the greedy rule LM drafters also propose their runner-up token
    beside the first chain tokens (DraftCall.alternatives) in the rounds where the length policy's
    measured row cost and the siblings' measured hit rate say they pay (width where rows are
    free). Greedy verification takes the verifier's argmax path, so the output is unchanged.
    """

    def __init__(
        self,
        verifier: VerifierBackend,
        drafters: Sequence[DrafterBackend] = (),
        *,
        draft_timeout_s: float | None = None,
        dynamic_length: bool = True,
        node_cost: float = 0.01,
        overlap_drafting: bool = False,
        ahead: DraftingAhead | str | None = None,
        min_draft_confidence: float = DEFAULT_MIN_DRAFT_CONFIDENCE,
        greedy_alternatives: bool = True,
    ) -> None:
        if not 0.0 <= min_draft_confidence < 1.0:
            raise ValueError(f"min_draft_confidence must be in [0, 1), got {min_draft_confidence}")
        names = [d.name for d in drafters]
        if len(set(names)) != len(names):
            raise ValueError(f"drafter names must be unique, got {names}")
        self.verifier = verifier
        self.drafters = list(drafters)
        self.draft_timeout_s = draft_timeout_s
        self.dynamic_length = dynamic_length
        self.node_cost = node_cost
        # a fixed length means exactly that length: the confidence stop is part of the dynamic one
        self.min_draft_confidence = min_draft_confidence if dynamic_length else 0.0
        self.overlap_drafting = overlap_drafting
        self.greedy_alternatives = greedy_alternatives
        # how the next round is drafted during verification (engine/ahead.py); overlap_drafting is
        # the full-acceptance bet's old name
        if isinstance(ahead, str) or ahead is None:
            ahead = make_strategy(ahead or ("full-acceptance" if overlap_drafting else None))
        self.ahead = ahead
        # per drafter set: what its LM drafters spend re-reading unseen text (engine/goodput.py)
        self._catch_up: dict[tuple[str, ...], CatchUpCost] = {}
        # per drafter set: the newest request's length policy, whose measured costs the next starts from
        self._last_policy: dict[tuple[str, ...], DraftLengthPolicy | TieredLengthPolicy] = {}
        self._in_flight = 0  # requests of this loop now running (they share the verifier)

    def chosen_drafters(self, request: GenerationRequest) -> list[DrafterBackend]:
        if request.drafters is None:
            return list(self.drafters)
        known = {d.name: d for d in self.drafters}
        unknown = [n for n in request.drafters if n not in known]
        if unknown:
            raise ValueError(f"drafters: unknown drafter(s) {unknown}; available: {sorted(known)}")
        return [known[n] for n in request.drafters]

    async def _draft_one(self, drafter: DrafterBackend, call: DraftCall) -> DraftReply | None:
        try:
            if self.draft_timeout_s is None:
                return await drafter.draft(call)
            return await asyncio.wait_for(drafter.draft(call), self.draft_timeout_s)
        except Exception as exc:  # noqa: BLE001 - any drafter failure only costs speed
            log.warning("drafter %s dropped for this round: %r", drafter.name, exc)
            return None

    async def _draft_all(self, drafters: Sequence[DrafterBackend], call: DraftCall) -> list[TokenTree]:
        trees, _ = await self._draft_timed(drafters, call)
        return trees

    async def _draft_timed(self, drafters: Sequence[DrafterBackend], call: DraftCall) -> tuple[list[TokenTree], float]:
        """The drafts, and the seconds the LM drafters among them computed (their own replies'
        times: on a CPU they share the compute thread, so they add up; waiting in its queue is
        not computing)."""
        replies = await asyncio.gather(*(self._draft_one(d, call) for d in drafters))
        computed = sum(r.seconds for d, r in zip(drafters, replies) if r is not None and not is_model_free(d))
        return [r.tree for r in replies if r is not None], computed

    def _length_policy(self, drafters: Sequence[DrafterBackend], max_depth: int, stops_itself: bool):
        """One DraftLengthPolicy; for a set mixing free and costly drafters, one per tier."""
        full = DraftLengthPolicy(max_depth, node_cost=self.node_cost,
                                 deep_prior_floor=self.min_draft_confidence if stops_itself else 0.0)
        free = [d for d in drafters if is_model_free(d)]
        if not free or len(free) == len(drafters):
            return full
        return TieredLengthPolicy(full, DraftLengthPolicy(max_depth, node_cost=self.node_cost))

    async def rounds(
        self, request: GenerationRequest, stats: GenerationStats | None = None
    ) -> AsyncIterator[RoundResult]:
        """Run the request round by round, yielding what each round committed.
        `stats`, when given, is updated in place as rounds complete."""
        self._in_flight += 1
        inner = None
        try:
            # Before its first reply, the requests in flight are the only sign of load it has. A
            # burst (streams that start together) arrives within one event-loop tick: yield it once,
            # so the first of them sees the others too. Otherwise the first one alone reads its
            # prompt with its LM drafters in round 0 while the rest queue behind it, and its prefill
            # then runs as a pass of its own instead of sharing theirs.
            await asyncio.sleep(0)
            inner = self._rounds(request, stats, joined_others=self._in_flight > 1)
            async for result in inner:
                yield result
        finally:
            self._in_flight -= 1
            if inner is not None:
                await inner.aclose()

    async def _rounds(
        self, request: GenerationRequest, stats: GenerationStats | None, joined_others: bool
    ) -> AsyncIterator[RoundResult]:
        if request.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {request.max_new_tokens}")
        if not request.prompt_ids:
            raise ValueError("prompt_ids must not be empty")
        drafters = self.chosen_drafters(request)
        rule = verification_rule(request.rule, request.sampling.greedy)  # sps at T = 0 is greedy
        coupling: Coupling = coupling_for_rule(rule)  # how drafters must draw siblings
        seed = request.seed if request.seed is not None else int(np.random.SeedSequence().entropy % (1 << 63))
        session_id = request.session_id or uuid.uuid4().hex
        stops = set(request.stop_token_ids)
        # mcsd-ti (LOSSY): fork-shaped trees [w, 1, 1, ...]: w target roots, one chain under each
        ti = rule == "mcsd-ti"
        ti_width = (request.tree_config[0] if request.tree_config else 2) if ti else 0
        roots: list[int] | None = None  # known after the first verification
        if ti:
            max_depth = request.draft_length
        else:
            max_depth = len(request.tree_config) if request.tree_config else request.draft_length
        # the confidence stop's deep prior only where a drafter stops on its confidence (an LM)
        free_drafters = [d for d in drafters if is_model_free(d)]
        stops_itself = len(free_drafters) < len(drafters)
        drafter_set = tuple(d.name for d in drafters)  # what the loop remembers across requests by
        # runner-up siblings (greedy only: another rule's tree must follow its coupling)
        may_widen = (self.greedy_alternatives and rule == "greedy" and stops_itself
                     and not request.tree_config)
        policy = self._length_policy(drafters, max_depth, stops_itself) if self.dynamic_length else None
        if policy is not None:
            # step and pass times are the machine's, not the request's: no timing rounds again
            earlier = self._last_policy.get(drafter_set)
            if type(earlier) is type(policy):
                policy.carry_costs_from(earlier)
            self._last_policy[drafter_set] = policy
        committed = list(request.prompt_ids)
        ahead_trees: list[TokenTree] = []  # next round's drafts, made during verification
        ahead_strategy = self.ahead
        # drafting ahead applies to the drafters' own drafts (engine/ahead.py); mcsd-ti roots and
        # k-config trees draft in-round
        if ti or request.tree_config or not drafters:
            ahead_strategy = None
        # no build answers this round (a miss; the first round has had no build): the strategy says
        # who drafts it (e.g. only the instant drafters while the prompt is unread)
        unanswered = ahead_strategy is not None
        generated = 0
        round_index = 0
        nodes_per_position = 1.0
        depth_cap = -1  # the verifier's cap from the last round (-1 = none)
        explore = False  # that cap was raised only to measure deeper rows (VerifyReply.explore)
        catch_up = self._catch_up.setdefault(drafter_set, CatchUpCost())
        seen = 0  # committed tokens the drafters had seen at their last draft
        announced = False  # the last verify call wanted drafting, so its cap weighed the catch-up
        last_verify_seconds = 0.0  # what drafting should fit under (drafters' scaling signal)
        while generated < request.max_new_tokens:
            started = time.perf_counter()
            remaining = request.max_new_tokens - generated
            # the correction/bonus token is free, so never draft past remaining - 1
            depth = policy.next_length(nodes_per_position) if policy else max_depth
            depth = min(depth, remaining - 1) if drafters else 0
            want = depth  # told to the verifier, which caps shared passes (engine/goodput.py)
            if depth_cap >= 0:  # the last shared pass's cap: drafting deeper would be cut anyway
                depth = min(depth, depth_cap)
            if ti and roots is None:
                depth = 0  # the first round only draws roots
            rseed = round_seed(seed, round_index)
            widen = policy.alternative_positions(depth, nodes_per_position) if may_widen and policy else 0

            def draft_call(num_tokens: int, alternatives: int = 0) -> DraftCall:
                return DraftCall(
                    session_id=session_id,
                    committed=list(committed),
                    num_tokens=num_tokens,
                    sampling=request.sampling,
                    seed=rseed,
                    tree_config=tuple(request.tree_config[:num_tokens]) if request.tree_config and not ti else None,
                    coupling=coupling,
                    roots=list(roots) if ti else None,
                    rule=rule,
                    verify_window_s=last_verify_seconds,
                    min_confidence=self.min_draft_confidence,
                    alternatives=alternatives,
                )

            trees: list[TokenTree] = []
            shadow: TokenTree | None = None  # an unverified draft that the emitted token judges
            draft_seconds = 0.0
            drafted_ahead = depth > 0 and bool(ahead_trees)
            round_drafters = (ahead_strategy.fallback_drafters(drafters, len(committed) - seen)
                              if unanswered else drafters)
            if explore or (policy is not None and policy.free_only):
                # rows to measure, not drafts to bet on (explore), or the whole set does not pay
                # this round while the free drafters alone do: the free drafters fill them
                round_drafters = [d for d in round_drafters if is_model_free(d)] or round_drafters
            under_load = depth_cap >= 0 or (round_index == 0 and joined_others)
            if under_load and not announced and len(committed) - seen >= catch_up.min_tokens:
                # under load, LM drafters that would first re-read unseen text (a new request's
                # whole prompt: seconds on a CPU, while every stream of the pass waits) wait one
                # round: this call now announces the depth it wants with that catch-up cost, and the
                # verifier's next cap says whether the pass lets them (engine/goodput.py)
                round_drafters = [d for d in round_drafters if is_model_free(d)]
            elif (policy is not None and depth > 0 and not policy.probing
                  and not all(is_model_free(d) for d in round_drafters)):
                # a re-read that the rest of the request cannot pay back (a long prompt, a short
                # answer; the tail of a request whose LM sat out under load) is not worth making:
                # what drafting saves a token, times the tokens left, against the catch-up's seconds.
                # Never for a probe: where the costs say drafting does not pay, what it saves is 0,
                # so any re-read "cannot pay back", the probe that would re-measure never ran, and
                # the LM stayed off for whole requests (Qwen, T = 1: 5 of 12 prompts undrafted)
                catch_up_cost = catch_up.seconds_for(len(committed) - seen)
                if catch_up_cost > 0 and catch_up_cost >= remaining * policy.seconds_saved_per_token(
                        depth, nodes_per_position):
                    round_drafters = [d for d in round_drafters if is_model_free(d)]
            if drafted_ahead:  # drafted during the last verification; cut to `depth` below
                trees = ahead_trees
                seen = len(committed)  # the build read the text up to here
                # the drafters that answer at once draft beside it from the real text: a suffix
                # match costs ~nothing and, where the text repeats, runs far past the LM's chain
                companions = ahead_strategy.companion_drafters(round_drafters)
                if companions:
                    trees = [*ahead_trees, *await self._draft_all(companions, draft_call(depth, widen))]
                    draft_seconds = time.perf_counter() - started
            elif depth > 0 and round_drafters:
                trees, computed = await self._draft_timed(round_drafters, draft_call(depth, widen))
                draft_seconds = time.perf_counter() - started
                if len(round_drafters) == len(drafters):  # (a model-free-only round re-reads nothing)
                    # what this draft computed beyond its positions' usual cost went into re-reading
                    catch_up.record(computed, len(committed) - seen, depth)
                    seen = len(committed)
            elif depth == 0 and want > 0 and depth_cap == 0 and policy is not None and not ti:
                # held at cap 0: keep this request's acceptance estimates alive with its model-free
                # drafters (engine/goodput.py), if they are what its policy's active tier drafts with
                if free_drafters and (policy.free_only or len(free_drafters) == len(drafters)):
                    shadow = merge_trees(await self._draft_all(free_drafters, draft_call(1)), max_depth=1)
            ahead_trees, unanswered = [], False
            if ti and roots is not None:
                root_tree = TokenTree()  # the roots stand even when every drafter failed
                for root in roots:
                    root_tree.propose(ROOT, root, None, TARGET_ROOT)
                tree = merge_trees([root_tree, *trees], max_depth=depth + 1)
            else:
                tree = merge_trees(trees, max_depth=depth)

            # drafting ahead (engine/ahead.py): the next round's draft is made during verification
            build = ahead_ctx = None
            if ahead_strategy is not None:
                next_depth = policy.best_length(nodes_per_position) if policy else max_depth
                ahead_ctx = AheadContext(
                    session_id=session_id, committed=list(committed), tree=tree, round_index=round_index,
                    seed=round_seed(seed, (1 << 32) + round_index),  # its own RNG stream
                    sampling=request.sampling, rule=rule, coupling=coupling,
                    next_depth=min(next_depth, max_depth, remaining - (tree.max_depth if len(tree) else 0) - 2),
                    accept_rates=policy.acceptance_rates() if policy else (),
                    drafters=drafters, draft_all=self._draft_all, min_confidence=self.min_draft_confidence,
                )
                build = ahead_strategy.start(ahead_ctx)
                if build is not None:
                    seen = len(committed)  # the build reads the text up to here (the prompt, at first)

            verify_started = time.perf_counter()
            accept_rates = tuple(policy.acceptance_rates(want)) if policy and want > 0 else ()
            verify_call = self.verifier.verify(
                VerifyCall(
                    session_id=session_id,
                    committed=list(committed),
                    tree=tree,
                    sampling=request.sampling,
                    rule=rule,
                    rule_params=request.rule_params,
                    seed=rseed,
                    ti_width=ti_width,
                    want_depth=want,
                    accept_rates=accept_rates,
                    draft_seconds=policy.draft_seconds_per_position() if policy else 0.0,
                    # if the pass lets it draft next round: the text it has not seen, + this round's
                    # token, spread over the rounds it has left
                    catch_up_seconds=catch_up.per_round(len(committed) + 1 - seen, remaining, accept_rates),
                    catch_up_rounds=rounds_left(remaining, accept_rates),
                )
            )
            try:
                reply = await verify_call
            except BaseException:
                if build is not None:
                    build.task.cancel()  # a stale build never outlives its round
                raise
            ahead_status = ""
            if build is not None:
                outcome = await ahead_strategy.take(build, ahead_ctx, reply, time.perf_counter() - verify_started)
                ahead_trees, ahead_status = outcome.trees, outcome.status
                unanswered = not ahead_trees
            if ti:
                if not reply.next_roots:
                    raise RuntimeError("the verifier backend returned no roots: it does not support mcsd-ti")
                roots = list(reply.next_roots)
            verify_seconds = time.perf_counter() - verify_started
            depth_cap, explore = reply.depth_cap, reply.explore
            announced = want > 0
            last_verify_seconds = verify_seconds
            if depth_cap >= 0 and len(tree) and tree.max_depth > depth_cap:
                # the verifier cut the tree to the shared pass's cap: account for what it verified
                # (the same deterministic cut, so reply.path's node ids match)
                tree = merge_trees([tree], max_depth=depth_cap)

            tokens = list(reply.tokens[:remaining])
            finish_reason = ""
            for i, tok in enumerate(tokens):
                if tok in stops:  # the stop token is emitted and ends generation
                    tokens, finish_reason = tokens[: i + 1], "stop"
                    break
            committed.extend(tokens)
            generated += len(tokens)
            if not finish_reason and generated >= request.max_new_tokens:
                finish_reason = "length"
            num_accepted = len(reply.path)
            num_drafted, drafted_depth = len(tree), tree.max_depth
            by_drafter = drafted_by_drafter(tree)
            # runner-up siblings: counted apart, so the policy's rates stay the chain's own
            siblings = sum(n for label, n in by_drafter.items() if is_alternative_label(label))
            sibling_hit = any(is_alternative_label(label) and n > 0 for label, n in reply.accepted_by_drafter.items())
            chain_accepted = num_accepted - int(sibling_hit)  # a sibling is a leaf: the path's last node
            if ti:  # roots are the verifier's own samples: neither drafted nor accepted drafts
                n_roots = len(tree.children(ROOT))
                num_accepted, num_drafted = max(num_accepted - 1, 0), num_drafted - n_roots
                drafted_depth = max(drafted_depth - 1, 0)
                by_drafter.pop(TARGET_ROOT, None)
            if policy is not None:
                # the first round's times include the prompt prefill (verifier and LM drafters):
                # acceptance counts, timings do not
                timed = round_index > 0
                policy.record(
                    drafted_depth,
                    chain_accepted,
                    draft_seconds if timed else 0.0,
                    verify_seconds if timed else 0.0,
                    num_drafted,
                )
                if siblings:  # judged where the chain was rejected at a position that had a sibling
                    policy.record_alternatives(judged=chain_accepted < min(drafted_depth, siblings), hit=sibling_hit)
                if shadow is not None and len(shadow) and tokens:
                    policy.record(*shadow_accepted(shadow, tokens))  # acceptance only, nothing timed
            if drafted_depth:
                nodes_per_position = (num_drafted - siblings) / drafted_depth
            log.debug(
                "round %d: depth %d, %d nodes, %d accepted, draft %.1f ms, verify %.1f ms, (jump, node) cost %s",
                round_index, drafted_depth, num_drafted, num_accepted, 1e3 * draft_seconds,
                1e3 * verify_seconds, policy.measured_costs() if policy else None,
            )
            result = RoundResult(
                tokens=tokens,
                num_drafted=num_drafted,
                num_accepted=num_accepted,
                accepted_by_drafter={k: v for k, v in reply.accepted_by_drafter.items() if k != TARGET_ROOT},
                drafted_by_drafter=by_drafter,
                finished=bool(finish_reason),
                finish_reason=finish_reason,
                draft_seconds=draft_seconds,
                verify_seconds=verify_seconds,
                drafted_depth=drafted_depth,
                drafted_ahead=drafted_ahead,
                ahead_status=ahead_status,
            )
            if stats is not None:
                stats.add_round(result, time.perf_counter() - started)
            round_index += 1
            yield result
            if finish_reason:
                return

    async def generate(self, request: GenerationRequest) -> tuple[list[int], GenerationStats]:
        stats = GenerationStats()
        tokens: list[int] = []
        async for result in self.rounds(request, stats):
            tokens.extend(result.tokens)
        return tokens, stats
