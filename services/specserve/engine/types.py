"""Request and result types of the in-process engine (the router speaks these too)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..sampling.params import SamplingParams

# LM drafters end a chain after a token they gave less than this (models/drafters.py: only draft
# lengths change, so it is lossless). BENCHMARKS.md section 2 measures the choice (0.4 and 0.8
# against none on the Qwen pair: 0.8 ahead in both runs, by a few %).
DEFAULT_MIN_DRAFT_CONFIDENCE = 0.8

# Acceptance rules. Lossless unless listed in LOSSY_RULES.
RULES = ("greedy", "sps", "cactus", "tas", "rrs", "rrs-wor", "spechub", "mcsd-ti")
LOSSY_RULES = frozenset({"cactus", "tas", "mcsd-ti"})  # mcsd-ti = improved MCSD root selection: LOSSY


def verification_rule(rule: str, greedy_sampling: bool) -> str:
    """The rule rounds run: at temperature 0 every lossless rule is the greedy rule. A one-hot
    target law accepts only the child equal to its argmax (p(x)/q(x) = 0 for any other token) and
    its residual max(p - q, 0) is still that argmax, whatever the drafts' laws q were; so the
    verifier reads the rows' argmax only, with no vocabulary-sized laws, and drafters send no rows
    (tests/test_sampling_tree_verify.py checks each lossless rule against the greedy walk). The
    lossy rules keep their own reading of a one-hot law."""
    return "greedy" if greedy_sampling and rule not in LOSSY_RULES else rule


@dataclass
class RuleParams:
    delta: float = 0.5  # cactus divergence budget (0 == sps)
    tas_epsilon: float = 0.09  # TAS posterior_threshold
    tas_alpha: float = 0.3  # TAS posterior_alpha (sqrt(epsilon) by convention)


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    max_new_tokens: int = 128
    sampling: SamplingParams = field(default_factory=SamplingParams)
    rule: str = "sps"
    rule_params: RuleParams = field(default_factory=RuleParams)
    draft_length: int = 16  # max chain depth per round (the dynamic length drafts as deep as pays)
    tree_config: tuple[int, ...] | None = None  # MCSD k-config, e.g. (2, 2, 1); None = chains
    drafters: tuple[str, ...] | None = None  # None = all configured drafters
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    session_id: str = ""


@dataclass
class RoundResult:
    """One draft/verify round."""

    tokens: list[int]  # newly committed: accepted drafts + correction/bonus token
    num_drafted: int  # draft nodes scored by the verifier this round
    num_accepted: int  # accepted draft tokens (bonus/correction excluded)
    accepted_by_drafter: dict[str, int] = field(default_factory=dict)
    drafted_by_drafter: dict[str, int] = field(default_factory=dict)
    finished: bool = False
    finish_reason: str = ""  # "length" | "stop" | ""
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    drafted_depth: int = 0  # deepest draft node this round (0 = verifier-only round)
    drafted_ahead: bool = False  # its draft was made during the previous verification (overlap)
    # what drafting ahead made of this round's verification: "hit" (the next draft is ready),
    # "miss", "late", "stale", "failed"; "" = no build
    ahead_status: str = ""


@dataclass
class GenerationStats:
    rounds: int = 0
    generated: int = 0
    drafted: int = 0
    accepted: int = 0
    accepted_per_position: list[int] = field(default_factory=list)  # index = depth - 1
    drafted_per_position: list[int] = field(default_factory=list)
    accepted_by_drafter: dict[str, int] = field(default_factory=dict)
    drafted_by_drafter: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    rounds_drafted_ahead: int = 0  # rounds whose draft came from overlapped drafting
    ahead_outcomes: dict[str, int] = field(default_factory=dict)  # ahead_status -> rounds

    def add_round(self, result: RoundResult, seconds: float = 0.0) -> None:
        """Fold one round in. Per-position counts: a round *offers* positions 1..drafted_depth and
        accepts positions 1..num_accepted, so accepted/drafted at index d - 1 is the rate at which
        position d survives verification when it was drafted (vLLM's per-position acceptance)."""
        self.rounds += 1
        self.generated += len(result.tokens)
        self.drafted += result.num_drafted
        self.accepted += result.num_accepted
        for counts, upto in (
            (self.drafted_per_position, result.drafted_depth),
            (self.accepted_per_position, result.num_accepted),
        ):
            counts.extend([0] * (upto - len(counts)))
            for d in range(upto):
                counts[d] += 1
        for name, n in result.drafted_by_drafter.items():
            self.drafted_by_drafter[name] = self.drafted_by_drafter.get(name, 0) + n
        for name, n in result.accepted_by_drafter.items():
            self.accepted_by_drafter[name] = self.accepted_by_drafter.get(name, 0) + n
        self.seconds += seconds
        self.draft_seconds += result.draft_seconds
        self.verify_seconds += result.verify_seconds
        self.rounds_drafted_ahead += int(result.drafted_ahead)
        if result.ahead_status:
            self.ahead_outcomes[result.ahead_status] = self.ahead_outcomes.get(result.ahead_status, 0) + 1

    @property
    def ahead_hit_rate(self) -> float:
        """Builds whose outcome happened / builds (0 without drafting ahead)."""
        builds = sum(self.ahead_outcomes.values())
        return self.ahead_outcomes.get("hit", 0) / builds if builds else 0.0

    def acceptance_rate(self, drafter: str) -> float:
        """Accepted / proposed tokens of one drafter (0 when it proposed nothing)."""
        drafted = self.drafted_by_drafter.get(drafter, 0)
        return self.accepted_by_drafter.get(drafter, 0) / drafted if drafted else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.generated / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_step(self) -> float:
        return self.generated / self.rounds if self.rounds else 0.0

    @property
    def mean_accepted_length(self) -> float:
        return self.accepted / self.rounds if self.rounds else 0.0
