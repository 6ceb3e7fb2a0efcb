"""The methods a benchmark compares, as data: what system runs them and with which settings.

A method name is what appears in the tables. Three systems:
* "plain": our verifier's plain decoding (`CausalLM.plain_generate`): the speedup baseline.
* "ours":  specserve's engine with the named drafters / rule / tree / cascade.
* "peer":  transformers' generate (bench/peer.py) on the same models.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from specserve.engine.types import DEFAULT_MIN_DRAFT_CONFIDENCE


@dataclass(frozen=True)
class Method:
    name: str
    system: str  # "plain" | "ours" | "peer"
    drafters: tuple[str, ...] = ()  # ours: "lm" | "ngram" | "prompt-lookup" | "suffix" | "cascade"
    rule: str = "sps"
    delta: float = 0.5  # cactus
    tree_config: tuple[int, ...] | None = None
    draft_length: int = 4
    peer_method: str = ""  # peer: one of bench.peer.PEER_METHODS
    only_sampled: bool = False  # meaningful only at temperature > 0 (lossy rules equal greedy at T=0)
    needs_lm_drafter: bool = False
    min_confidence: float = DEFAULT_MIN_DRAFT_CONFIDENCE  # ours: LM drafters end a chain after a token they gave less
    greedy_alternatives: bool = True  # ours: runner-up siblings beside greedy chains where rows are free
    tags: tuple[str, ...] = field(default_factory=tuple)


def catalogue(draft_length: int = 4, cactus_deltas: tuple[float, ...] = (0.5, 1.0),
              confidences: tuple[float, ...] = (0.0, 0.4)) -> dict[str, Method]:
    """Every method the speed benchmark knows, by name."""
    k = draft_length
    methods = [
        Method("plain", "plain"),
        Method("chain", "ours", ("lm",), draft_length=k, needs_lm_drafter=True),
        # the chain without runner-up siblings (engine/loop.py greedy_alternatives): what width buys
        Method("chain-narrow", "ours", ("lm",), draft_length=k, needs_lm_drafter=True, greedy_alternatives=False),
        # `chain` has the shipped confidence stop (DEFAULT_MIN_DRAFT_CONFIDENCE); these other
        # thresholds (0 = none) are for comparison (models/drafters.py: lengths only, lossless)
        *[
            Method(f"chain-conf-{c:g}", "ours", ("lm",), draft_length=k, needs_lm_drafter=True, min_confidence=c)
            for c in confidences
        ],
        # k-config trees: sampled only (under greedy the draft rows are one-hot, so the siblings
        # coincide and the tree collapses to the chain)
        Method("tree-2x2", "ours", ("lm",), tree_config=(2, 2) + (1,) * max(0, k - 2),
               draft_length=k, only_sampled=True, needs_lm_drafter=True),
        Method("cascade", "ours", ("cascade",), draft_length=k, needs_lm_drafter=True),
        Method("ngram", "ours", ("ngram",), draft_length=k),
        Method("prompt-lookup", "ours", ("prompt-lookup",), draft_length=k),
        Method("suffix", "ours", ("suffix",), draft_length=k),
        # the model-free trio (the embedded default's drafters)
        Method("suffix+ngram+pl", "ours", ("suffix", "ngram", "prompt-lookup"), draft_length=k),
        Method("lm+suffix", "ours", ("lm", "suffix"), draft_length=k, needs_lm_drafter=True),
        Method("lm+ngram", "ours", ("lm", "ngram"), draft_length=k, needs_lm_drafter=True),
        # acceptance rules on the LM chain (identical to `chain` under greedy decoding)
        *[
            Method(f"chain-cactus-{d:g}", "ours", ("lm",), rule="cactus", delta=d, draft_length=k,
                   only_sampled=True, needs_lm_drafter=True, tags=("lossy",))
            for d in cactus_deltas
        ],
        Method("chain-tas", "ours", ("lm",), rule="tas", draft_length=k, only_sampled=True,
               needs_lm_drafter=True, tags=("lossy",)),
        # multi-draft rules need a branching tree
        Method("tree-rrs-wor", "ours", ("lm",), rule="rrs-wor", tree_config=(2, 2) + (1,) * max(0, k - 2),
               draft_length=k, only_sampled=True, needs_lm_drafter=True),
        # SpecHub's hub coupling is binary at every level (sample_siblings refuses k = 1)
        Method("tree-spechub", "ours", ("lm",), rule="spechub", tree_config=(2, 2), draft_length=2,
               only_sampled=True, needs_lm_drafter=True),
        # the peer
        Method("hf-plain", "peer", peer_method="hf-plain"),
        Method("hf-assisted", "peer", peer_method="hf-assisted", needs_lm_drafter=True),
        # the same with our (quantized, when --drafter MODEL@int8) drafter modules
        Method("hf-assisted-q", "peer", peer_method="hf-assisted-q", needs_lm_drafter=True),
        Method("hf-prompt-lookup", "peer", peer_method="hf-prompt-lookup"),
    ]
    return {m.name: m for m in methods}


def select(names: list[str], catalogue_: dict[str, Method]) -> list[Method]:
    unknown = [n for n in names if n not in catalogue_]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {sorted(catalogue_)}")
    chosen = [catalogue_[n] for n in names]
    if "plain" not in names:  # the speedup baseline always runs
        chosen.insert(0, catalogue_["plain"])
    return chosen
