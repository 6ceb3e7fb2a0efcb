"""Improved MCSD (Lu et al. 2024, "DynaSD"): target-initialised roots, longest-branch
selection, and the early-stop decision model.

THIS RULE IS LOSSY (ALGORITHMS.md 3.3). The next round's first-level candidates ("roots") are
drawn from the verifier's own law and emitted without verification; among several roots the
one whose draft continuation is accepted longest wins. Choosing among *different* roots by
downstream acceptance biases the output towards "easy to continue" tokens, in sampling AND in
greedy mode (a 2nd-ranked root can win). It is exposed as rule "mcsd-ti" and every function
that selects among roots says "lossy" in its name. For lossless multi-candidate decoding use
k-config trees (tree.kconfig_shape) with rrs / rrs-wor / spechub instead.

The decision model is a small MLP on the drafter's last hidden state that predicts the
clipped acceptance probability min(1, t/d) of the token drafted from it; drafting stops when
every branch scores <= tau (0.4, as in the reference).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..tree.token_tree import ROOT, TokenTree
from .multidraft import sample_siblings
from .rules import normalize_or, one_hot

DECISION_THRESHOLD = 0.4


# ---- target-initialised roots and longest-branch selection (LOSSY) -----------------------
def ti_roots_lossy(root_probs: torch.Tensor, width: int, generator: torch.Generator | None) -> list[int]:
    """Draw `width` distinct roots from the verifier's law (unverified; LOSSY once selected
    among). For greedy decoding pass the verifier's temperature-1 law: the processed greedy
    row is one-hot and has a single root."""
    tokens, _ = sample_siblings(root_probs, width, "without_replacement", generator)
    return tokens


@dataclass
class LossyBranchSelection:
    path: list[int]  # kept root + its accepted draft run (node ids)
    drafters: list[str]  # drafter of each path node (roots carry the caller's label)
    run_lengths: list[int]  # accepted draft run per branch, in branch order
    branch: int  # index of the kept branch
    fully_accepted: bool
    next_root_probs: torch.Tensor  # [V] law for the next round's roots
    branches: list[list[int]] = field(default_factory=list)  # node ids per branch (root first)


def _branches(tree: TokenTree) -> list[list[int]]:
    """Every root-to-leaf path, roots and children in proposal order (depth first)."""
    out: list[list[int]] = []

    def walk(node: int, prefix: list[int]) -> None:
        kids = tree.children(node)
        if not kids:
            out.append(prefix)
        for kid in kids:
            walk(kid, prefix + [kid])

    for root in tree.children(ROOT):
        walk(root, [root])
    return out


def select_branch_lossy(
    tree: TokenTree, target_probs: torch.Tensor, generator: torch.Generator | None
) -> LossyBranchSelection:
    """DynaSD verification (LOSSY): first-level nodes are target-initialised roots, accepted
    unverified; every drafted node below gets its own uniform and passes iff u * d(x) < t(x)
    (for one-hot greedy rows this is exactly "x == argmax t"); the branch with the longest
    leading run wins, the first one on ties (and the first root if every run is empty).
    The next roots are drawn from t after a fully accepted branch, else from
    norm((t - d)_+) at the first rejected node.
    """
    vocab = target_probs.shape[-1]
    n = len(tree)
    u = torch.rand(n, generator=generator)
    source: dict[int, tuple[torch.Tensor, str]] = {}
    for parent, props in tree.proposals.items():
        for p in props:
            if p.child not in source:
                row = one_hot(tree.tokens[p.child], vocab) if p.draft_probs is None else p.draft_probs.float()
                source[p.child] = (row, p.drafter)
    x = torch.tensor(tree.tokens, dtype=torch.long)
    parent_rows = torch.stack([target_probs[0 if p == ROOT else p + 1] for p in tree.parents]) if n else None
    draft_rows = torch.stack([source[i][0] for i in range(n)]) if n else None
    ok = (
        u * draft_rows.gather(-1, x[:, None]).squeeze(-1) < parent_rows.gather(-1, x[:, None]).squeeze(-1)
        if n
        else torch.zeros(0, dtype=torch.bool)
    )

    branches = _branches(tree)
    if not branches:
        raise ValueError("mcsd-ti needs at least one target-initialised root")
    runs = []
    for br in branches:
        run = 0
        for node in br[1:]:
            if not bool(ok[node]):
                break
            run += 1
        runs.append(run)
    best = max(range(len(runs)), key=lambda j: (runs[j], -j))
    branch = branches[best]
    kept = branch[: 1 + runs[best]]
    full = len(kept) == len(branch)
    if full:
        next_root = target_probs[kept[-1] + 1]
    else:
        failed = branch[len(kept)]
        parent = tree.parents[failed]
        t = target_probs[0 if parent == ROOT else parent + 1]
        next_root = normalize_or((t - draft_rows[failed]).clamp_min(0.0), t)
    return LossyBranchSelection(
        path=kept,
        drafters=[source[i][1] for i in kept],
        run_lengths=runs,
        branch=best,
        fully_accepted=full,
        next_root_probs=next_root,
        branches=branches,
    )


def ti_first_token_law_lossy(
    t1: torch.Tensor, accept_given_root: torch.Tensor, width: int = 2
) -> torch.Tensor:
    """Exact law of the first emitted token of TI-MCSD with one draft step per root (the
    ALGORITHMS.md 3.3 bias toy): roots drawn without replacement from t1, branch j's draft is
    accepted w.p. accept_given_root[root_j], the longest run wins (first on ties). Small V only
    (enumerates ordered root tuples and accept patterns)."""
    t1 = t1.double()
    acc = accept_given_root.double()
    law = torch.zeros_like(t1)
    vocab = t1.shape[0]
    for roots in itertools.permutations(range(vocab), width):
        p_roots, mass = 1.0, 1.0
        for r in roots:
            p_roots *= float(t1[r]) / mass
            mass -= float(t1[r])
        if p_roots == 0.0:
            continue
        for pattern in itertools.product((0, 1), repeat=width):
            p = p_roots
            for r, ok in zip(roots, pattern):
                p *= float(acc[r]) if ok else 1.0 - float(acc[r])
            law[roots[pattern.index(max(pattern))]] += p
    return law


# ---- early-stop decision model -------------------------------------------------------------
class DecisionModel(nn.Module):
    """hidden state [.., H] -> P(keep drafting) in (0, 1): Linear-ReLU-Linear-sigmoid."""

    def __init__(self, hidden_size: int, width: int = 64):
        super().__init__()
        self.hidden_size, self.width = hidden_size, width
        self.net = nn.Sequential(nn.Linear(hidden_size, width), nn.ReLU(), nn.Linear(width, 1))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(hidden.float())).squeeze(-1)

    def save(self, path: str | Path) -> None:
        torch.save({"hidden_size": self.hidden_size, "width": self.width, "state": self.state_dict()}, path)

    @classmethod
    def load(cls, path: str | Path) -> DecisionModel:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        model = cls(int(blob["hidden_size"]), int(blob["width"]))
        model.load_state_dict(blob["state"])
        return model.eval()


def acceptance_targets(t_x: torch.Tensor, d_x: torch.Tensor) -> torch.Tensor:
    """Soft training labels min(1, t(x)/d(x)) observed at verification ("soft" variant)."""
    return torch.where(d_x > 0, (t_x / d_x.clamp_min(1e-30)).clamp(max=1.0), torch.zeros_like(t_x))


def train_decision_model(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    epochs: int = 10,
    lr: float = 1e-3,
    batch_size: int = 256,
    seed: int = 0,
    width: int = 64,
) -> DecisionModel:
    """BCE on (hidden, min(1, t/d)) pairs with Adam, learning rate halved every epoch (as in
    the reference training script)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DecisionModel(hidden.shape[-1], width)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    loss_fn = nn.BCELoss()
    hidden, targets = hidden.float(), targets.float()
    for _ in range(epochs):
        order = torch.randperm(hidden.shape[0], generator=gen)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            opt.zero_grad()
            loss_fn(model(hidden[idx]), targets[idx]).backward()
            opt.step()
        sched.step()
    return model.eval()


def should_stop(scores: torch.Tensor, tau: float = DECISION_THRESHOLD) -> bool:
    """Stop drafting when every branch's keep-drafting score is <= tau."""
    return bool((scores <= tau).all())
