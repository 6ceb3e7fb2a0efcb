"""Verify a whole token tree against the verifier's rows: walk from ROOT, accept or stop.

`target_probs[0]` is the processed verifier law after the committed prefix and
`target_probs[1 + i]` the law after tree node i (models/base.py convention). At each node the
proposals are verified in their recorded order:

  rule                      single proposal      several proposals (branching node)
  greedy                    exact match          first child equal to argmax t
  sps / rrs / rrs-wor /     SpS                  the lossless verifier of tree.coupling[node]:
    spechub                                        independent -> RRS, without_replacement ->
                                                   RRS-wor, hub -> SpecHub (+ RRS for extras)
  cactus (LOSSY)            Cactus               the coupling's lossless verifier: Cactus is
                                                   defined for chains only (ALGORITHMS.md
                                                   1.7.2) and per-child h^(n) inside RRS is not
                                                   covered by its theory, so branching nodes
                                                   stay exact
  tas (LOSSY)               typical acceptance   first child passing the criterion
  mcsd-ti (LOSSY)           delegated to mcsd.select_branch_lossy: first-level nodes are
                              target-initialised roots and are accepted WITHOUT verification,
                              so they must be drawn from the verifier's law (ti_roots_lossy),
                              never from a drafter

A fully accepted leaf gets a bonus token from the UNMODIFIED target row at the leaf (argmax
for greedy). Which sibling verifier runs is the coupling's decision, not the rule's: rrs,
rrs-wor and spechub differ only in how the drafter was told to sample (`coupling_for_rule`).

Randomness: one generator per request; uniforms are drawn node by node in walk order
(k uniforms for the k proposals, then one for a correction or bonus), never per vocab entry.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..tree.token_tree import ROOT, Coupling, Proposal, TokenTree
from .multidraft import hub_token, rrs_verify, spechub_verify
from .params import greedy_tokens
from .rules import (
    cactus_step,
    greedy_accept,
    normalize_or,
    one_hot,
    sample_row,
    tas_accept,
)

RULES = ("greedy", "sps", "cactus", "tas", "rrs", "rrs-wor", "spechub", "mcsd-ti")
LOSSY_RULES = frozenset({"cactus", "tas", "mcsd-ti"})

_COUPLING_FOR_RULE: dict[str, Coupling] = {
    "greedy": "independent",  # greedy drafters take their top-k; the coupling is irrelevant
    "sps": "independent",
    "cactus": "independent",
    "tas": "independent",
    "rrs": "independent",
    "rrs-wor": "without_replacement",
    "spechub": "hub",
    "mcsd-ti": "without_replacement",  # target-initialised roots are drawn without replacement
}


def coupling_for_rule(rule: str) -> Coupling:
    """How drafters must sample siblings for `rule` (the verifier relies on it)."""
    try:
        return _COUPLING_FOR_RULE[rule]
    except KeyError:
        raise ValueError(f"unknown rule {rule!r}; expected one of {RULES}") from None


@dataclass
class RuleConfig:
    """Knobs of the lossy rules (engine.types.RuleParams has the same field names)."""

    delta: float = 0.5
    tas_epsilon: float = 0.09
    tas_alpha: float = 0.3


@dataclass
class NodeDecision:
    accepted: int | None  # index into the node's proposals, None = every proposal rejected
    token: int  # the accepted proposal's token, or the correction token


@dataclass
class TreeVerdict:
    path: list[int]  # accepted node ids, root to leaf
    tokens: list[int]  # path tokens + one correction/bonus token (every rule, mcsd-ti included)
    accepted_drafters: list[str] = field(default_factory=list)  # per accepted depth
    bonus: bool = False  # the last token is a bonus (leaf fully accepted), not a correction
    # mcsd-ti only: the law DynaSD draws the next round's target-initialised roots from. The
    # last token of `tokens` is one draw from it; an engine that drafts w > 1 roots instead
    # commits tokens[:-1] and draws its roots with mcsd.ti_roots_lossy(next_root_probs, w, g).
    next_root_probs: torch.Tensor | None = None

    @property
    def num_accepted(self) -> int:
        """Accepted draft tokens (the bonus/correction token excluded)."""
        return len(self.path)

    @property
    def accepted_per_depth(self) -> list[int]:
        """1 for every accepted depth 1..len(path) (index = depth - 1)."""
        return [1] * len(self.path)


def drafted_counts(tree: TokenTree) -> tuple[list[int], dict[str, int]]:
    """Draft nodes per depth (index = depth - 1) and proposals per drafter, for metrics."""
    per_depth = [0] * tree.max_depth
    for depth in tree.depths:
        per_depth[depth - 1] += 1
    per_drafter: dict[str, int] = {}
    for props in tree.proposals.values():
        for p in props:
            per_drafter[p.drafter] = per_drafter.get(p.drafter, 0) + 1
    return per_depth, per_drafter


def _row_of(p: Proposal, token: int, vocab: int) -> torch.Tensor:
    return one_hot(token, vocab) if p.draft_probs is None else p.draft_probs.float()


def _same_law(a: Proposal, b: Proposal) -> bool:
    """Consecutive proposals form one without-replacement block iff one drafter drew both
    from one row. Deterministic proposals (no row) are each their own block."""
    if a.draft_probs is None or b.draft_probs is None or a.drafter != b.drafter:
        return False
    return a.draft_probs is b.draft_probs or torch.equal(a.draft_probs, b.draft_probs)


def verify_node(
    t: torch.Tensor,
    proposals: list[Proposal],
    tokens: list[int],
    rule: str,
    coupling: Coupling,
    hub: int | None,
    config: RuleConfig,
    generator: torch.Generator | None,
) -> NodeDecision:
    """Verify the proposals under one node against target row t [V]."""
    vocab = t.shape[-1]
    k = len(proposals)
    x = torch.tensor(tokens, dtype=torch.long)
    if rule == "greedy":
        ok = greedy_accept(t.unsqueeze(0).expand(k, -1), x)
        return _first_or(ok, tokens, int(t.argmax()))
    if rule == "tas":
        ok = tas_accept(t, x, config.tas_epsilon, config.tas_alpha)
        return _first_or(ok, tokens, int(t.argmax()))

    u = torch.rand(1, k, generator=generator)
    rows = torch.stack([_row_of(p, tok, vocab) for p, tok in zip(proposals, tokens)])
    if coupling == "hub" and hub is None and k >= 2:
        hub = hub_token(rows[0])  # the drafter's hub is argmax of the law it sampled from
    if k == 1:
        # chains: SpS, or Cactus for the lossy rule (delta = 0 consumes the same uniforms as SpS)
        delta = config.delta if rule == "cactus" else 0.0
        accepted, residual = cactus_step(t, rows[0], x, u[:, 0], delta)
        accepted_idx = torch.where(accepted, 0, -1)
    elif coupling == "hub" and hub is not None and k >= 2 and hub in tokens[:2]:
        accepted_idx, residual = spechub_verify(
            t, rows[0], torch.tensor(hub), x[:1], x[1:2], u[:, 0], u[:, 1]
        )
        if k > 2:  # extra (e.g. merged) proposals: independent RRS on what is still owed
            still = accepted_idx < 0
            more_idx, residual = rrs_verify(residual[0], rows[2:], x[None, 2:], u[:, 2:])
            accepted_idx = torch.where(still & (more_idx >= 0), more_idx + 2, accepted_idx)
    elif coupling == "hub":
        raise ValueError(f"hub node: the first two proposals {tokens[:2]} must contain the hub {hub}")
    else:
        wor = coupling == "without_replacement"
        continues = [False] + [wor and _same_law(proposals[i - 1], proposals[i]) for i in range(1, k)]
        accepted_idx, residual = rrs_verify(t, rows, x.unsqueeze(0), u, continues)

    idx = int(accepted_idx[0])
    if idx >= 0:
        return NodeDecision(idx, tokens[idx])
    return NodeDecision(None, sample_row(normalize_or(residual[0], t), generator))


def _first_or(ok: torch.Tensor, tokens: list[int], fallback: int) -> NodeDecision:
    hits = torch.nonzero(ok).flatten()
    if len(hits):
        i = int(hits[0])
        return NodeDecision(i, tokens[i])
    return NodeDecision(None, fallback)


def verify_tree(
    tree: TokenTree,
    target_probs: torch.Tensor,
    rule: str,
    rule_params: object | None = None,
    generator: torch.Generator | None = None,
) -> TreeVerdict:
    """Accept a root-to-leaf path of `tree` and emit one more token (see module docstring).

    target_probs [len(tree) + 1, V] fp32 processed laws. rule_params: anything with the fields
    delta / tas_epsilon / tas_alpha (engine.types.RuleParams, RuleConfig) or None for defaults.
    """
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; expected one of {RULES}")
    if target_probs.shape[0] != len(tree) + 1:
        raise ValueError(f"target_probs has {target_probs.shape[0]} rows, tree needs {len(tree) + 1}")
    if rule == "greedy":
        return verify_tree_greedy(tree, greedy_tokens(target_probs))
    config = _config(rule_params)
    target_probs = target_probs.float()
    if rule == "mcsd-ti":
        from .mcsd import select_branch_lossy

        sel = select_branch_lossy(tree, target_probs, generator)
        # Keep the shared contract (path tokens + one more token): the extra token is a draw
        # from DynaSD's next-root law, i.e. what a one-root round would emit next.
        extra = sample_row(sel.next_root_probs, generator)
        return TreeVerdict(
            path=sel.path,
            tokens=[tree.tokens[n] for n in sel.path] + [extra],
            accepted_drafters=sel.drafters,
            bonus=sel.fully_accepted,
            next_root_probs=sel.next_root_probs,
        )

    node, path, drafters = ROOT, [], []
    while True:
        t = target_probs[0 if node == ROOT else node + 1]
        proposals = tree.proposals.get(node, [])
        if not proposals:
            bonus = sample_row(t, generator)  # (greedy returned above, from verify_tree_greedy)
            tokens = [tree.tokens[n] for n in path] + [bonus]
            return TreeVerdict(path, tokens, drafters, bonus=True)
        decision = verify_node(
            t,
            proposals,
            [tree.tokens[p.child] for p in proposals],
            rule,
            tree.coupling.get(node, "independent"),
            tree.hub_token.get(node),
            config,
            generator,
        )
        if decision.accepted is None:
            tokens = [tree.tokens[n] for n in path] + [decision.token]
            return TreeVerdict(path, tokens, drafters, bonus=False)
        chosen = proposals[decision.accepted]
        path.append(chosen.child)
        drafters.append(chosen.drafter)
        node = chosen.child


def verify_tree_greedy(tree: TokenTree, best: list[int]) -> TreeVerdict:
    """The greedy rule on the verifier's argmax per row (`best[0]` after the committed prefix,
    `best[1 + i]` after node i): walk the children equal to the argmax; the first miss emits the
    argmax as its correction, a leaf reached emits it as the bonus. Plain Python on ints: the
    rows' argmax is all greedy reads, so no vocabulary-sized law is built (verify_tree accepts
    one-hot rows or raw logits alike, their argmax is the same)."""
    node, path, drafters = ROOT, [], []
    while True:
        want = best[0 if node == ROOT else node + 1]
        proposals = tree.proposals.get(node, [])
        chosen = next((p for p in proposals if tree.tokens[p.child] == want), None)
        if chosen is None:
            return TreeVerdict(path, [tree.tokens[n] for n in path] + [want], drafters, bonus=not proposals)
        path.append(chosen.child)
        drafters.append(chosen.drafter)
        node = chosen.child


def _config(rule_params: object | None) -> RuleConfig:
    if rule_params is None:
        return RuleConfig()
    return RuleConfig(
        delta=float(getattr(rule_params, "delta", RuleConfig.delta)),
        tas_epsilon=float(getattr(rule_params, "tas_epsilon", RuleConfig.tas_epsilon)),
        tas_alpha=float(getattr(rule_params, "tas_alpha", RuleConfig.tas_alpha)),
    )
