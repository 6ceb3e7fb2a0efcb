"""Neural drafters (models.base.Drafter): a small causal LM, or the verifier's own first layers.

A drafter keeps its own KV-cached session per request and rolls back to the committed text at
the start of every round (`LMSession.sync` keeps the longest common prefix, so a rollback is a
crop, not a re-prefill). Every drafted token is sampled from its processed law (the same
`process_logits` as the verifier), and that row travels with the token because lossless
acceptance rules need it.

Draft and verifier must share a tokenizer: `check_same_tokenizer` refuses clearly otherwise.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from ..sampling.mcsd import DECISION_THRESHOLD, should_stop
from ..sampling.params import SamplingParams, greedy_token, process_logits
from ..tree.token_tree import ROOT, Coupling, TokenTree
from .base import AheadUnit, DraftProposal
from .causal_lm import CausalLM, SessionCache, sample_token, truncated_copy


class TokenizerMismatchError(ValueError):
    """A drafter and a verifier do not share a vocabulary."""


def check_same_tokenizer(a: CausalLM, b: CausalLM) -> None:
    """Refuse (raise TokenizerMismatchError, naming both models) unless the two tokenizers map
    the same strings to the same ids. Embedding sizes may differ (padded rows are never sampled)."""
    vocab_a, vocab_b = a.tokenizer.get_vocab(), b.tokenizer.get_vocab()
    if vocab_a == vocab_b:
        return
    only_a = len(vocab_a.keys() - vocab_b.keys())
    only_b = len(vocab_b.keys() - vocab_a.keys())
    moved = sum(1 for tok, i in vocab_a.items() if tok in vocab_b and vocab_b[tok] != i)
    raise TokenizerMismatchError(
        f"drafter and verifier must share a tokenizer, but {a.name!r} ({len(vocab_a)} tokens) and "
        f"{b.name!r} ({len(vocab_b)} tokens) differ: {only_a} tokens only in {a.name!r}, "
        f"{only_b} only in {b.name!r}, {moved} with different ids"
    )


def _fit_vocab(probs: torch.Tensor, vocab_size: int | None) -> torch.Tensor:
    """Pad (with zeros) or cut rows to the verifier's vocabulary size. Cutting only drops padded
    embedding rows, which the shared tokenizer can never produce."""
    if vocab_size is None or probs.shape[-1] == vocab_size:
        return probs
    if probs.shape[-1] > vocab_size:
        cut = probs[..., :vocab_size]
        return cut / cut.sum(-1, keepdim=True)
    pad = torch.zeros(*probs.shape[:-1], vocab_size - probs.shape[-1], dtype=probs.dtype)
    return torch.cat([probs, pad], dim=-1)


def _runner_up(logits: torch.Tensor, vocab_size: int | None) -> int:
    """The second-ranked token id among the verifier's vocabulary (ids past it cannot be verified)."""
    row = logits[:vocab_size] if vocab_size else logits
    return int(torch.topk(row, 2).indices[1])


def _top_probability(logits: torch.Tensor) -> float:
    """softmax(logits).max() without building the softmax: 1 / sum exp(l - max)."""
    top = logits.max()
    return float(1.0 / torch.exp(logits.float() - top).sum())


class LMDrafter:
    """Drafts with any causal LM that shares the verifier's tokenizer."""

    def __init__(
        self,
        lm: CausalLM,
        name: str | None = None,
        max_sessions: int = 64,
        target_vocab_size: int | None = None,
        with_hidden: bool = False,
        decision_model=None,
        decision_threshold: float = DECISION_THRESHOLD,
    ) -> None:
        self.lm = lm
        self.name = name or f"lm:{lm.name}"
        self.sessions = SessionCache(lm, max_sessions)
        self.target_vocab_size = target_vocab_size  # rows are fitted to the verifier's V
        self.with_hidden = with_hidden  # return hidden states (MCSD decision model input)
        # MCSD early stop: an MLP on the hidden state that produces the next token's law predicts
        # whether that token would be accepted; a chain stops when the score is <= the threshold.
        # Only the draft length changes, so any rule stays exactly as lossless as it was.
        self.decision_model = decision_model
        self.decision_threshold = decision_threshold
        self.early_stops = 0  # chains cut short by the decision model (for stats and tests)
        self.confidence_stops = 0  # chains ended by the confidence stop (propose's min_confidence)

    def propose(
        self,
        context: list[int],
        num_tokens: int,
        params: SamplingParams,
        generator: torch.Generator | None = None,
        session_id: str = "",
        min_confidence: float = 0.0,
        alternatives: int = 0,
    ) -> DraftProposal:
        """A chain of up to `num_tokens` tokens, each drawn from the processed law after the
        previous ones. `hidden[i]` is the last-layer state that produced the law of token i.

        alternatives (greedy only): also return the runner-up token of the first `alternatives`
        positions' logits, which the caller may verify as a sibling of that chain token (a leaf):
        when the verifier rejects the chain token there, it often picks the runner-up, and then
        the row computed for it yields one more token. They cost the drafter nothing (the same
        logits).

        Confidence stop (as transformers' assistant_confidence_threshold): the chain ends after a
        token the drafter itself gave less than `min_confidence` (its probability at T = 1 under
        greedy, under the processed law when sampling). Its forward is paid, so that token is
        kept; what is saved is drafting past it, where acceptance collapses. Only lengths change:
        every rule stays exactly as lossless as it was."""
        if not 0.0 <= min_confidence < 1.0:
            raise ValueError(f"min_confidence must be in [0, 1), got {min_confidence}")
        session = self.sessions.get(session_id)
        session.sync(context)
        tokens: list[int] = []
        rows: list[torch.Tensor] = []
        hidden: list[torch.Tensor] = []
        runners_up: list[int] = []
        alternatives = alternatives if params.greedy else 0
        for i in range(num_tokens):
            logits = session.next_logits()
            if self.decision_model is not None and i > 0:  # the first token is always drafted
                with torch.inference_mode():
                    score = self.decision_model(session.next_hidden()[None])
                if should_stop(score, self.decision_threshold):
                    self.early_stops += 1
                    break
            if self.with_hidden:
                hidden.append(session.next_hidden())
            if params.greedy:  # the processed row is one-hot at the argmax: a deterministic proposal
                token = greedy_token(logits)
                confident = min_confidence <= 0 or _top_probability(logits) >= min_confidence
                if i < alternatives:
                    runners_up.append(_runner_up(logits, self.target_vocab_size))
            else:
                probs = _fit_vocab(process_logits(logits, params), self.target_vocab_size)
                token = sample_token(probs, generator)
                rows.append(probs)
                confident = float(probs[token]) >= min_confidence
            tokens.append(token)
            session.append(token)  # lazy: the last token's forward only runs if asked for
            if not confident and i + 1 < num_tokens:
                self.confidence_stops += 1
                break
        if params.greedy:
            probs_out = None  # one-hot rows, implied (models/base.py): nothing vocabulary-sized to ship
        else:
            probs_out = torch.stack(rows) if rows else torch.empty(0, self.target_vocab_size or self.lm.vocab_size)
        return DraftProposal(
            tokens=tokens,
            probs=probs_out,
            drafter=self.name,
            hidden=torch.stack(hidden) if hidden else None,
            alternatives=runners_up if alternatives else None,
        )

    def propose_ahead(
        self,
        context: list[int],
        chain: list[int],
        fanout: list[int],
        num_tokens: int,
        params: SamplingParams,
        generator: torch.Generator | None = None,
        session_id: str = "",
        deadline_s: float = 0.0,
        cancelled: Callable[[], bool] | None = None,
        parents: Sequence[int] | None = None,
    ) -> list[AheadUnit]:
        """Draft the next round for the likely outcomes of verifying `chain` after `context`
        (engine/ahead.py): for each end e of the draft (0 = nothing accepted, 1 + i = the
        accepted path ends at node i; `parents[i]` is node i's parent, -1 the root, default a
        chain, where e is the accept length k), the drafter's top `fanout[e]` guesses of the bonus
        token (excluding the tokens of e's children, which would have been accepted), each
        continued `num_tokens` tokens. All branches decode together: one forward over the draft
        tree, then one per continuation step over every branch's frontier
        (LMSession.extend_scored). Continuations are drawn from the processed law, rows kept.
        deadline_s > 0: no continuation step starts that would end past it (by the last step's
        time), so the build returns on time with every branch as deep as it got. `cancelled()`
        true (the build was cancelled: its round went another way): no further step starts, so the
        drafter's compute is free for the draft that round needs now."""
        started = time.perf_counter()
        session = self.sessions.get(session_id)
        session.sync(context)
        parents = list(range(-1, len(chain) - 1)) if parents is None else list(parents)
        if len(parents) != len(chain) or any(not -1 <= p < i for i, p in enumerate(parents)):
            raise ValueError(f"propose_ahead: parents must name an earlier node (or -1) for each of the {len(chain)} nodes")
        tree = TokenTree()
        children: list[list[int]] = [[] for _ in range(len(chain) + 1)]  # child tokens, by end
        for token, parent in zip(chain, parents):
            tree.add_node(parent if parent >= 0 else ROOT, token)
            children[parent + 1].append(token)
        logits = session.score_tree(tree)  # row e: the law after context + the path to end e
        units: list[tuple[int, int, int]] = []  # (e, bonus, frontier node)
        for e, width in enumerate(fanout[: len(chain) + 1]):
            if width <= 0:
                continue
            row = logits[e].clone()
            row[children[e]] = float("-inf")  # those tokens would have been accepted
            for guess in torch.topk(row, min(width, row.shape[-1] - len(children[e]))).indices.tolist():
                units.append((e, guess, tree.add_node(e - 1 if e > 0 else ROOT, guess)))
        tokens: list[list[int]] = [[] for _ in units]
        rows: list[list[torch.Tensor]] = [[] for _ in units]
        step_seconds = 0.0
        for step in range(num_tokens if units else 0):
            step_started = time.perf_counter()
            if deadline_s > 0 and step_started - started + step_seconds > deadline_s:
                break  # the next step would make the build late: what is built is the draft
            if cancelled is not None and cancelled():
                break
            # one forward over every branch's newest node: its law gives the next token
            new_logits = session.extend_scored(tree)
            first_new = len(tree) - len(new_logits)
            frontier = [node for _, _, node in units]
            for u, node in enumerate(frontier):
                row = new_logits[node - first_new]
                if params.greedy:
                    token = greedy_token(row)
                else:
                    probs = _fit_vocab(process_logits(row, params), self.target_vocab_size)
                    token = sample_token(probs, generator)
                    rows[u].append(probs)
                tokens[u].append(token)
                if step + 1 < num_tokens:  # the last token's law is not needed
                    k, guess, _ = units[u]
                    units[u] = (k, guess, tree.add_node(node, token))
            step_seconds = time.perf_counter() - step_started
        out = []
        for (k, guess, _), toks, rws in zip(units, tokens, rows):
            probs = None if params.greedy else (torch.stack(rws) if rws else torch.empty(0, self.target_vocab_size or self.lm.vocab_size))
            out.append(AheadUnit(k, guess, DraftProposal(tokens=toks, probs=probs, drafter=self.name)))
        return out

    def draft_tree(
        self,
        context: list[int],
        tree_config: tuple[int, ...] | list[int],
        params: SamplingParams,
        coupling: Coupling = "independent",
        generator: torch.Generator | None = None,
        session_id: str = "",
    ) -> TokenTree:
        """A k-config tree (MCSD): `tree_config[l]` children under every node of level l, drawn
        from that node's law with `sample_siblings` under `coupling`. One forward per level:
        the partial tree is scored with the tree mask on top of the committed text."""
        from ..sampling.multidraft import sample_siblings

        session = self.sessions.get(session_id)
        session.sync(context)
        tree = TokenTree()
        frontier = [ROOT]
        for k in tree_config:
            logits = session.score_tree(tree)  # row 0: after the context; row 1 + i: after node i
            next_frontier: list[int] = []
            for parent in frontier:
                row = 0 if parent == ROOT else 1 + parent
                probs = _fit_vocab(process_logits(logits[row], params), self.target_vocab_size)
                tokens, hub = sample_siblings(probs, k, coupling, generator)
                tree.coupling[parent] = coupling
                if hub is not None:
                    tree.hub_token[parent] = hub
                for token in tokens:
                    child = tree.propose(parent, token, probs, self.name)
                    if child not in next_frontier:  # duplicates merge into one node
                        next_frontier.append(child)
            frontier = next_frontier
        return tree


class EarlyExitDrafter(LMDrafter):
    """The verifier's first `num_layers` layers + its final norm and lm_head, sharing weights.
    Free to deploy (no extra memory) but untrained for this use: low acceptance on real models."""

    def __init__(self, verifier: CausalLM, num_layers: int, max_sessions: int = 64) -> None:
        super().__init__(
            truncated_copy(verifier, num_layers),
            name=f"early-exit:{num_layers}",
            max_sessions=max_sessions,
        )
