"""The peer: transformers' own speculative decoding, run on the same models in the same process.

* `hf-assisted`: `model.generate(..., assistant_model=drafter)` (Leviathan/Chen speculative sampling at
  temperature > 0, exact match at temperature 0; transformers adapts the draft length on its own).
* `hf-prompt-lookup`: `model.generate(..., prompt_lookup_num_tokens=k)`.
* `hf-early-exit`: `model.generate(..., assistant_early_exit=n)` (self-speculation from the first n layers).
* `hf-plain`: `model.generate` with no assistant (the peer's own plain decoding).

transformers does not report how many tokens were drafted or accepted, so we wrap the candidate
generator it builds for each call: `get_candidates` tells the draft length of every round and
`update_candidate_strategy` the number of matches. That gives the same per-position counts as our
engine without changing what transformers computes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers.generation.streamers import BaseStreamer

PEER_METHODS = ("hf-plain", "hf-assisted", "hf-prompt-lookup", "hf-early-exit")


@dataclass
class PeerCounts:
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    accepted_per_position: list[int] = field(default_factory=list)
    drafted_per_position: list[int] = field(default_factory=list)
    _pending_length: int = 0

    def record_round(self, candidate_length: int, matches: int) -> None:
        self.rounds += 1
        self.drafted += candidate_length
        self.accepted += matches
        for pos in range(candidate_length):
            if pos >= len(self.drafted_per_position):
                self.drafted_per_position.append(0)
                self.accepted_per_position.append(0)
            self.drafted_per_position[pos] += 1
            if pos < matches:
                self.accepted_per_position[pos] += 1


def _instrument(model, counts: PeerCounts):
    """Wrap this model instance's candidate-generator factory; returns an undo function."""
    original = model._get_candidate_generator

    def factory(*args, **kwargs):
        gen = original(*args, **kwargs)
        get_candidates = gen.get_candidates
        update = gen.update_candidate_strategy

        def counted_get_candidates(input_ids, *a, **kw):
            cand_ids, cand_logits = get_candidates(input_ids, *a, **kw)
            counts._pending_length = int(cand_ids.shape[1] - input_ids.shape[1])
            return cand_ids, cand_logits

        def counted_update(input_ids, scores, num_matches):
            counts.record_round(counts._pending_length, int(num_matches))
            return update(input_ids, scores, num_matches)

        gen.get_candidates = counted_get_candidates
        gen.update_candidate_strategy = counted_update
        return gen

    model._get_candidate_generator = factory
    return lambda: delattr(model, "_get_candidate_generator")


@dataclass
class PeerResult:
    tokens: list[int]
    seconds: float
    counts: PeerCounts | None  # None for hf-plain (one verifier pass per token)
    first_token_seconds: float | None = None  # time to the first new token (prefill included)


class _FirstTokenStreamer(BaseStreamer):
    """A transformers streamer that only notes when the first new token arrives (generate's first
    `put` is the prompt, the second the first new token)."""

    def __init__(self) -> None:
        self.puts = 0
        self.at: float | None = None

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:
            self.at = time.perf_counter()

    def end(self) -> None:
        pass


def peer_generate(
    method: str,
    model,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float,
    seed: int,
    assistant=None,
    prompt_lookup_tokens: int = 4,
    early_exit_layers: int = 4,
    stop_ids: tuple[int, ...] = (),
) -> PeerResult:
    """Run one transformers generation; greedy when temperature == 0, else top-p 1 / top-k off."""
    if method not in PEER_METHODS:
        raise ValueError(f"unknown peer method {method!r}; choose from {PEER_METHODS}")
    kwargs: dict = dict(
        max_new_tokens=max_new_tokens,
        min_new_tokens=0,
        do_sample=temperature > 0,
        pad_token_id=(stop_ids[0] if stop_ids else None),
        eos_token_id=list(stop_ids) or None,
        repetition_penalty=1.0,  # a model's generation_config may set one; our decoding has none
    )
    if temperature > 0:
        kwargs.update(temperature=temperature, top_p=1.0, top_k=0)
    if method == "hf-assisted":
        if assistant is None:
            raise ValueError("hf-assisted needs an assistant model")
        kwargs["assistant_model"] = assistant
    elif method == "hf-prompt-lookup":
        kwargs["prompt_lookup_num_tokens"] = prompt_lookup_tokens
    elif method == "hf-early-exit":
        kwargs["assistant_early_exit"] = early_exit_layers
    counts = PeerCounts() if method != "hf-plain" else None
    first = _FirstTokenStreamer()
    kwargs["streamer"] = first
    undo = _instrument(model, counts) if counts is not None else None
    input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=model.device)
    try:
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
        seconds = time.perf_counter() - t0
        first_token_seconds = None if first.at is None else first.at - t0
    finally:
        if undo is not None:
            undo()
    tokens = [int(t) for t in out[0, len(prompt_ids) :]]
    return PeerResult(tokens, seconds, counts, first_token_seconds)
