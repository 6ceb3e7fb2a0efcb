"""The two roles of a round, as message-passing interfaces.

The decode loop (engine/) talks to drafters and to the verifier only through these calls,
so the same loop runs in one process (local workers) and in the Ray Serve router (the same
calls carried as protobuf over DeploymentHandles). Calls are stateless: each one carries the
session id and the committed token ids, so any replica can serve it (a cache miss re-prefills);
replicas keep per-session KV caches in a bounded LRU.

Randomness is derived from (seed, round index), never from replica state, so a retried or
re-routed call draws the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from ..sampling.params import SamplingParams
from ..tree.token_tree import Coupling, TokenTree
from .types import RuleParams


@dataclass
class DraftCall:
    session_id: str
    committed: list[int]  # prompt + generated so far
    num_tokens: int  # chain depth wanted (tree depth for k-config trees)
    sampling: SamplingParams
    seed: int  # already mixed with the round index
    tree_config: tuple[int, ...] | None = None  # k children per level; None = one chain
    coupling: Coupling = "independent"  # how siblings are sampled (rule-dependent)
    # mcsd-ti (LOSSY): target-initialised roots; extend EACH root with a chain of num_tokens
    roots: list[int] | None = None
    # the round's acceptance rule: drafters ignore it; a remote transport uses it to ship only
    # the draft rows the rule reads (none for greedy/tas, fp16 for lossy rules, else exact)
    rule: str = ""
    # the request's last verification time (0 = none yet): drafting should fit under it; drafter
    # deployments report draft time / this to their autoscaler (serve/autoscaling.py)
    verify_window_s: float = 0.0
    # LM drafters end the chain after a token they gave less than this (0 = off; lengths only)
    min_confidence: float = 0.0
    # greedy chains: LM drafters also propose their runner-up token beside each of the first
    # `alternatives` chain tokens, as a leaf labelled alternative_label(drafter) (0 = a chain)
    alternatives: int = 0


@dataclass
class AheadCall:
    """Draft the next round for the likely outcomes of verifying `chain` (engine/ahead.py)."""

    session_id: str
    committed: list[int]  # the text before the round being verified
    chain: list[int]  # the draft being verified: its nodes' tokens, topological order
    fanout: list[int]  # bonus-token guesses per end e = 0..len(chain) (for a chain: accept length k)
    num_tokens: int  # each guess continued this many tokens
    sampling: SamplingParams
    seed: int
    stamp: str  # (session, committed length, generation): echoed, so a stale build is never used
    rule: str = ""  # for the transport: which rows to ship (as DraftCall.rule)
    # stop continuing once another step would end past this many seconds of the build, and return
    # the units as deep as they got (0 = none): a build that would be late is still on time, shallower
    deadline_s: float = 0.0
    # node i's parent in `chain` (-1: the root); empty = a chain. An end e is where the accepted
    # path stops: 0 = nothing accepted, 1 + i = at node i (so for a chain, e = k)
    parents: list[int] = field(default_factory=list)


@dataclass
class AheadUnitTree:
    accepted: int  # e: the verifier's accepted path ends there (AheadCall.parents) ...
    bonus: int  # ... and its correction/bonus token is this
    tree: TokenTree  # the next round's draft after that


@dataclass
class AheadReply:
    stamp: str
    units: list[AheadUnitTree]
    drafter: str
    seconds: float = 0.0


@dataclass
class DraftReply:
    tree: TokenTree  # this drafter's candidates (a chain is a one-branch tree)
    drafter: str
    seconds: float = 0.0


@dataclass
class VerifyCall:
    session_id: str
    committed: list[int]
    tree: TokenTree  # merged candidates of all drafters
    sampling: SamplingParams
    rule: str
    rule_params: RuleParams
    seed: int  # already mixed with the round index
    ti_width: int = 0  # mcsd-ti: how many roots to draw for the next round (0 = other rules)
    # what the request's draft-length policy would draft uncapped, and its per-position acceptance
    # estimates: the verifier sets one depth cap per shared pass from these (engine/goodput.py).
    # want_depth -1 = not said (the tree's own depth; acceptance then assumed at 0.5)
    want_depth: int = -1
    accept_rates: tuple[float, ...] = ()
    draft_seconds: float = 0.0  # the request's measured drafting seconds per drafted position
    # what its LM drafters would first spend catching up on text they have not seen (engine/goodput.py),
    # spread over `catch_up_rounds` rounds (0 = not spread: the seconds are this pass's share)
    catch_up_seconds: float = 0.0
    catch_up_rounds: float = 0.0


@dataclass
class VerifyReply:
    tokens: list[int]  # accepted draft tokens + the correction/bonus token
    path: list[int]  # accepted node ids, root to leaf
    accepted_by_drafter: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    next_roots: list[int] = field(default_factory=list)  # mcsd-ti: the next round's roots
    # the depth cap of the shared pass this call ran in (its tree was cut to it; the next draft
    # should be no deeper); -1 = no cap (the call had the pass to itself)
    depth_cap: int = -1
    # the cap was raised one deeper only to measure those rows' cost (engine/goodput.py): the
    # next round drafts them with model-free drafters (free drafts fill rows as well as an LM's)
    explore: bool = False


def is_model_free(drafter) -> bool:
    """A drafter (backend or models-level) whose drafts cost ~nothing: no model, nothing to re-read,
    no confidence of its own (`model_free` on n-gram / suffix drafters and their backends)."""
    return getattr(drafter, "model_free", False)


class DrafterBackend(Protocol):
    name: str

    async def draft(self, call: DraftCall) -> DraftReply: ...


class VerifierBackend(Protocol):
    async def verify(self, call: VerifyCall) -> VerifyReply: ...


ALTERNATIVE_SUFFIX = "/alt"


def alternative_label(drafter: str) -> str:
    """The label of a drafter's runner-up siblings (DraftCall.alternatives): their acceptance is
    counted apart from the chain's, so the loop can tell whether they pay."""
    return drafter + ALTERNATIVE_SUFFIX


def is_alternative_label(label: str) -> bool:
    return label.endswith(ALTERNATIVE_SUFFIX)
