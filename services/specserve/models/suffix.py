"""Suffix drafting (SuffixDecoding, Oliaro et al. 2024; vLLM's `suffix` method, ArcticInference).

Model-free: a suffix trie of bounded depth over token ids, where every node counts how often its
path occurred. The longest suffix of the text found in the trie is the *match*; its children's
counts estimate what comes next. From the match node the drafter grows a speculation TREE best
first by estimated path probability (the product of count ratios along the path), keeping nodes
whose probability is at least `min_token_prob`, with at most `max_spec_factor * match length`
nodes (a short match predicts little, so it speculates little) and at most the round's depth.

Two tries: one per request over prompt + output (what the text repeats of itself), and one
global trie over earlier requests' outputs (what answers to similar requests repeat), bounded in
tokens: when it holds more than `max_global_tokens`, the oldest requests are dropped and the trie
is rebuilt. Each round the tree of the trie with the higher expected accepted length is used.
Proposals are deterministic (probs = None: one-hot rows), so every lossless rule stays lossless.
Pure Python, no I/O; in the Ray app it lives in the n-gram drafter deployment, so the global trie
is per replica.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from ..sampling.params import SamplingParams
from ..tree.token_tree import ROOT, TokenTree
from .base import DraftProposal


@dataclass
class _Node:
    count: int = 0
    children: dict[int, "_Node"] = field(default_factory=dict)


class SuffixTrie:
    """Every substring of length <= `depth` of the inserted sequences, with occurrence counts.
    Appending one token costs O(depth): the open suffixes each grow by one node."""

    def __init__(self, depth: int = 24) -> None:
        if depth < 2:
            raise ValueError(f"suffix trie depth must be >= 2, got {depth}")
        self.depth = depth
        self.root = _Node()
        self.num_nodes = 0

    def new_cursor(self) -> list[_Node]:
        """The open suffixes of one sequence being appended to (pass it to `append`)."""
        return []

    def append(self, cursor: list[_Node], token: int) -> None:
        """Extend the sequence behind `cursor` by `token`: every suffix ending at it (up to the
        trie depth) gains one occurrence."""
        self.root.count += 1
        grown: list[_Node] = []
        for node in [self.root, *cursor]:
            child = node.children.get(token)
            if child is None:
                child = node.children[token] = _Node()
                self.num_nodes += 1
            child.count += 1
            grown.append(child)
        cursor[:] = grown[: self.depth - 1]  # suffixes at full depth stop growing

    def extend(self, tokens: list[int]) -> None:
        cursor = self.new_cursor()
        for token in tokens:
            self.append(cursor, token)

    def match(self, context: list[int], max_length: int | None = None) -> tuple[_Node | None, int]:
        """The node of the longest suffix of `context` present in the trie with a continuation
        (a child), and its length; (None, 0) when not even the last token has one."""
        longest = min(len(context), max_length or self.depth - 1, self.depth - 1)
        for length in range(longest, 0, -1):
            node = self.root
            for token in context[len(context) - length :]:
                node = node.children.get(token)
                if node is None:
                    break
            if node is not None and node.children:
                return node, length
        return None, 0


def speculation_tree(
    node: _Node, max_nodes: int, max_depth: int, min_token_prob: float
) -> tuple[list[tuple[int, int, float]], float]:
    """Best-first expansion below `node`: up to `max_nodes` (parent index, token, path prob)
    entries in topological order (parent -1 = the match), and their summed probability, which is
    the expected number of accepted tokens if the counts were the verifier's law."""
    out: list[tuple[int, int, float]] = []
    heap: list[tuple[float, int, int, int, _Node, int]] = []  # (-prob, tiebreak, parent, token, node, depth)
    tiebreak = 0

    def push_children(parent_node: _Node, parent_index: int, prob: float, depth: int) -> None:
        nonlocal tiebreak
        if depth > max_depth:
            return
        total = sum(c.count for c in parent_node.children.values())
        for token, child in parent_node.children.items():
            p = prob * child.count / total
            if p >= min_token_prob:
                tiebreak += 1
                heapq.heappush(heap, (-p, tiebreak, parent_index, token, child, depth))

    push_children(node, -1, 1.0, 1)
    expected = 0.0
    while heap and len(out) < max_nodes:
        neg_p, _, parent_index, token, child, depth = heapq.heappop(heap)
        out.append((parent_index, token, -neg_p))
        expected += -neg_p
        push_children(child, len(out) - 1, -neg_p, depth + 1)
    return out, expected


class SuffixDrafter:
    """SuffixDecoding's drafter (module doc). `propose_tree` drafts a tree, `propose` its most
    likely chain (for callers that take chains only)."""

    model_free = True  # runs no torch kernels (engine/local.py runs it off the compute thread)

    def __init__(
        self,
        name: str = "suffix",
        depth: int = 24,
        max_spec_factor: float = 2.0,
        min_token_prob: float = 0.1,
        max_sessions: int = 64,
        max_global_tokens: int = 100_000,
    ) -> None:
        if max_spec_factor <= 0:
            raise ValueError(f"max_spec_factor must be > 0, got {max_spec_factor}")
        if not 0.0 <= min_token_prob <= 1.0:
            raise ValueError(f"min_token_prob must be in [0, 1], got {min_token_prob}")
        self.name = name
        self.depth = depth
        self.max_spec_factor = max_spec_factor
        self.min_token_prob = min_token_prob
        self.max_sessions = max_sessions
        self.max_global_tokens = max_global_tokens
        # session id -> its trie over prompt + output (and where appending goes on), LRU
        self._sessions: OrderedDict[str, _Session] = OrderedDict()
        self.global_trie = SuffixTrie(depth)
        # outputs in the global trie, oldest first: a session's global key -> its output so far
        self._global_outputs: OrderedDict[int, list[int]] = OrderedDict()
        self._global_tokens = 0
        self._started = 0

    # ---- state ----------------------------------------------------------------------------
    def _session(self, session_id: str, context: list[int]) -> "_Session":
        session = self._sessions.get(session_id)
        if session is not None and context[: len(session.tokens)] != session.tokens:
            session = None  # the text was rewritten (a different request under this id): start over
        if session is None:
            self._started += 1  # its own key in the global trie: a restarted id is a new output
            session = _Session(SuffixTrie(self.depth), prompt_len=len(context), global_key=self._started)
            self._sessions[session_id] = session
            while len(self._sessions) > self.max_sessions:
                self._sessions.popitem(last=False)
        self._sessions.move_to_end(session_id)
        for token in context[len(session.tokens) :]:
            session.trie.append(session.cursor, token)
            session.tokens.append(token)
            if len(session.tokens) > session.prompt_len:
                self._add_global(session, token)
        return session

    def _add_global(self, session: "_Session", token: int) -> None:
        output = self._global_outputs.get(session.global_key)
        if output is None:
            output = self._global_outputs[session.global_key] = []
            session.global_cursor = self.global_trie.new_cursor()
        output.append(token)
        self.global_trie.append(session.global_cursor, token)
        self._global_tokens += 1
        if self._global_tokens > self.max_global_tokens:
            self._shrink_global()

    def _shrink_global(self) -> None:
        """Drop the oldest outputs until at most half the budget is left, then rebuild."""
        while self._global_tokens > self.max_global_tokens // 2 and len(self._global_outputs) > 1:
            _, dropped = self._global_outputs.popitem(last=False)
            self._global_tokens -= len(dropped)
        self.global_trie = SuffixTrie(self.depth)
        cursors = {}
        for key, output in self._global_outputs.items():
            cursors[key] = self.global_trie.new_cursor()
            for token in output:
                self.global_trie.append(cursors[key], token)
        for session in self._sessions.values():  # live outputs keep growing from where they are
            session.global_cursor = cursors.get(session.global_key, [])

    # ---- drafting ---------------------------------------------------------------------------
    def draft_entries(self, context: list[int], num_tokens: int, session_id: str = "") -> list[tuple[int, int, float]]:
        """The speculation tree as (parent index, token, prob) entries (see speculation_tree)."""
        if num_tokens <= 0 or not context:
            return []
        self._session(session_id, list(context))
        best: list[tuple[int, int, float]] = []
        best_score = 0.0
        for trie in (self._sessions[session_id].trie, self.global_trie):
            node, length = trie.match(context)
            if node is None:
                continue
            budget = max(1, min(num_tokens, int(self.max_spec_factor * length)))
            entries, score = speculation_tree(node, budget, num_tokens, self.min_token_prob)
            if score > best_score:
                best, best_score = entries, score
        return best

    def propose_tree(
        self,
        context: list[int],
        num_tokens: int,
        params: SamplingParams | None = None,
        generator: torch.Generator | None = None,
        session_id: str = "",
    ) -> TokenTree:
        tree = TokenTree()
        nodes: list[int] = []
        for parent, token, _ in self.draft_entries(context, num_tokens, session_id):
            nodes.append(tree.propose(ROOT if parent < 0 else nodes[parent], token, None, self.name))
        return tree

    def propose(
        self,
        context: list[int],
        num_tokens: int,
        params: SamplingParams | None = None,
        generator: torch.Generator | None = None,
        session_id: str = "",
    ) -> DraftProposal:
        """The most likely chain of the speculation tree."""
        entries = self.draft_entries(context, num_tokens, session_id)
        chain: list[int] = []
        parent = -1
        for index, (p, token, _) in enumerate(entries):
            if p == parent:  # entries come best first: the first child seen is the likeliest
                chain.append(token)
                parent = index
        return DraftProposal(tokens=chain[:num_tokens], probs=None, drafter=self.name)


@dataclass
class _Session:
    trie: SuffixTrie
    prompt_len: int
    global_key: int
    tokens: list[int] = field(default_factory=list)
    cursor: list = field(default_factory=list)
    global_cursor: list = field(default_factory=list)
