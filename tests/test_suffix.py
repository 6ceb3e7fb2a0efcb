"""Suffix drafting (models/suffix.py): trie counts, matching, speculation trees, the global trie
and its bound, and exactness through the decode loop on a tiny model."""

from __future__ import annotations

import pytest

from specserve.engine import GenerationRequest, SpeculativeEngine
from specserve.engine.local import LocalDrafter, LocalVerifier
from specserve.models.suffix import SuffixDrafter, SuffixTrie, speculation_tree
from specserve.sampling.params import SamplingParams
from specserve.tree.token_tree import ROOT

from test_engine import PROMPT, plain, tiny_lm


def node_of(trie: SuffixTrie, path):
    node = trie.root
    for t in path:
        node = node.children[t]
    return node


def test_trie_counts_every_bounded_substring():
    trie = SuffixTrie(depth=3)
    trie.extend([1, 2, 3, 1, 2, 4])
    assert node_of(trie, [1]).count == 2
    assert node_of(trie, [1, 2]).count == 2
    assert {t: c.count for t, c in node_of(trie, [1, 2]).children.items()} == {3: 1, 4: 1}
    assert node_of(trie, [2, 3, 1]).count == 1
    assert not node_of(trie, [2, 3, 1]).children  # depth 3: no longer paths
    with pytest.raises(KeyError):
        node_of(trie, [3, 4])


def test_match_is_the_longest_suffix_with_a_continuation():
    trie = SuffixTrie(depth=8)
    trie.extend([7, 1, 2, 3, 9, 2, 3])
    node, length = trie.match([5, 1, 2, 3])
    assert length == 3 and set(node.children) == {9}
    node, length = trie.match([4, 4, 2, 3])  # only "2 3" occurs (followed by 9)
    assert length == 2 and set(node.children) == {9}
    assert trie.match([42]) == (None, 0)


def test_speculation_tree_is_best_first_and_pruned():
    trie = SuffixTrie(depth=6)
    trie.extend([1, 2, 3, 5, 1, 2, 3, 5, 1, 2, 4, 6])  # after "1 2": 3 twice, 4 once
    node, _ = trie.match([1, 2])
    entries, expected = speculation_tree(node, max_nodes=10, max_depth=3, min_token_prob=0.1)
    assert entries[0][:2] == (-1, 3) and entries[0][2] == pytest.approx(2 / 3)
    assert (-1, 4) in [e[:2] for e in entries]
    assert all(p >= 0.1 for _, _, p in entries)
    assert expected == pytest.approx(sum(p for _, _, p in entries))
    # a stricter threshold drops the 1/3 branch, a node budget cuts the tree
    strict, _ = speculation_tree(node, max_nodes=10, max_depth=3, min_token_prob=0.5)
    assert [e[1] for e in strict] == [3, 5, 1]
    assert len(speculation_tree(node, max_nodes=2, max_depth=3, min_token_prob=0.0)[0]) == 2


def test_drafter_copies_what_the_text_repeats_and_drafts_trees():
    drafter = SuffixDrafter(min_token_prob=0.1, max_spec_factor=4)
    context = [10, 11, 12, 13, 14, 50, 10, 11, 12, 13, 15, 51, 10, 11]
    chain = drafter.propose(context, 4, SamplingParams(), session_id="s").tokens
    assert chain[:2] == [12, 13]  # the likeliest continuation of "10 11"
    tree = drafter.propose_tree(context, 4, SamplingParams(), session_id="s")
    assert tree.max_depth <= 4 and len(tree) <= 4
    below_13 = tree.children(tree.children(tree.children(ROOT)[0])[0])
    assert sorted(tree.tokens[n] for n in below_13) == [14, 15]  # both seen continuations
    assert all(p.draft_probs is None and p.drafter == "suffix" for ps in tree.proposals.values() for p in ps)


def test_short_matches_speculate_little():
    drafter = SuffixDrafter(max_spec_factor=1.0, min_token_prob=0.0)
    context = [1, 2, 3, 4, 5, 6, 7, 1]  # match length 1
    assert len(drafter.propose_tree(context, 8, session_id="a")) == 1


def test_global_trie_carries_outputs_across_requests():
    drafter = SuffixDrafter(max_spec_factor=4)
    prompt_a = [90, 91, 92]
    out = [10, 11, 12, 13, 14]
    for n in range(len(out) + 1):  # request a, round by round
        drafter.propose(prompt_a + out[:n], 3, session_id="a")
    # request b never saw 11 12 13 in its own text, but request a produced them after 10
    assert drafter.propose([80, 81, 10], 3, session_id="b").tokens == [11, 12, 13]
    # a request's prompt stays out of the global trie
    assert drafter.propose([70, 90], 3, session_id="c").tokens == []


def test_global_trie_is_bounded():
    drafter = SuffixDrafter(max_global_tokens=40, max_sessions=4)
    for s in range(30):
        prompt = [200 + s]
        output = [s % 7 + 1, 100 + s, 101 + s, 102 + s, 103 + s, 104 + s]
        drafter.propose(prompt, 2, session_id=f"s{s}")  # the first call sees the prompt alone
        drafter.propose(prompt + output, 2, session_id=f"s{s}")
        assert drafter._global_tokens <= 40
    assert len(drafter._sessions) <= 4
    assert drafter.propose([999, 100], 2, session_id="new").tokens == []  # s0's output was dropped
    assert drafter.propose([999, 129], 2, session_id="new2").tokens == [130, 131]  # the newest kept


def test_rewritten_session_starts_over():
    drafter = SuffixDrafter()
    drafter.propose([1, 2, 3, 1, 2], 2, session_id="x")
    # the same id with a different text: nothing of the old text remains in its own trie
    assert drafter.propose([5, 6, 1], 2, session_id="x").tokens == []


@pytest.mark.parametrize("rule,temperature", [("greedy", 0.0), ("sps", 1.0)])
def test_suffix_drafting_through_the_loop_is_exact(rule, temperature):
    verifier = tiny_lm(0)
    engine = SpeculativeEngine(LocalVerifier(verifier), [LocalDrafter(SuffixDrafter())])
    prompt = PROMPT * 3  # repetitive: the trie has something to propose
    request = GenerationRequest(prompt_ids=prompt, max_new_tokens=40, rule=rule, draft_length=6,
                                sampling=SamplingParams(temperature=temperature), seed=3)
    tokens, stats = engine.run(request)
    if rule == "greedy":
        assert tokens == plain(verifier, 40, prompt=prompt)
    assert len(tokens) == 40 and stats.drafted > 0
    assert stats.accepted_by_drafter.get("suffix", 0) == stats.accepted
