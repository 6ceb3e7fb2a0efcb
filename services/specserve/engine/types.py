"""Request and result types of the in-process engine (the router speaks these too)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..sampling.params import SamplingParams

# Acceptance rules. Lossless unless listed in LOSSY_RULES.
RULES = ("greedy", "sps", "cactus", "tas", "rrs", "rrs-wor", "spechub", "mcsd-ti")
LOSSY_RULES = frozenset({"cactus", "tas", "mcsd-ti"})  # mcsd-ti = improved MCSD root selection: LOSSY


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
    draft_length: int = 4  # max chain depth per round (dynamic length may use less)
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

    @property
    def tokens_per_step(self) -> float:
        return self.generated / self.rounds if self.rounds else 0.0

    @property
    def mean_accepted_length(self) -> float:
        return self.accepted / self.rounds if self.rounds else 0.0
