"""Request validation, run BEFORE any model work.

Every check raises `InvalidRequest(field, message)`; the service turns it into gRPC INVALID_ARGUMENT
with the text "<field>: <message>", so a client always learns which field was wrong. Field names are the
proto paths (`sampling.top_p`, `prompt.token_ids[3]`, `tree.branching[1]`).

Two steps, because the prompt length is only known after tokenization:
  1. `validate_request(req, ...)` - every field that does not need the tokenizer;
  2. `validate_prompt_ids(ids, ...)` - vocabulary range and context length of the (tokenized) prompt.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from pydantic import BaseModel, Field, model_validator

from ..engine.types import RULES
from ..v1 import generation_pb2 as gen_pb

SPECHUB_MAX_BRANCHING = 2  # SpecHub's hub coupling is defined for two children (ALGORITHMS.md 2.4)


class InvalidRequest(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class RequestLimits(BaseModel):
    """What one request may ask for (server configuration)."""

    default_max_new_tokens: int = Field(128, ge=1)
    max_new_tokens: int = Field(4096, ge=1)
    default_rule: str = "sps"
    # a request's maximum depth when it names none (the dynamic length picks per round); None = max_draft_length
    default_draft_length: int | None = Field(None, ge=1)
    max_draft_length: int = Field(16, ge=1)
    max_tree_nodes: int = Field(64, ge=1)  # draft nodes per round (sum over levels of the k-config products)
    max_stop_sequences: int = Field(16, ge=0)
    max_stop_sequence_chars: int = Field(256, ge=1)
    max_prompt_chars: int = Field(1_000_000, ge=1)  # refuse before tokenizing something absurd
    max_session_id_chars: int = Field(128, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> "RequestLimits":
        if self.default_rule not in RULES:
            raise ValueError(f"default_rule must be one of {RULES}, got {self.default_rule!r}")
        if self.default_max_new_tokens > self.max_new_tokens:
            raise ValueError("default_max_new_tokens must not exceed max_new_tokens")
        if self.default_draft_length is None:
            self.default_draft_length = self.max_draft_length
        elif self.default_draft_length > self.max_draft_length:
            raise ValueError("default_draft_length must not exceed max_draft_length")
        return self


@dataclass(frozen=True)
class ModelInfo:
    """What validation needs to know about the served models."""

    vocab_size: int
    max_context: int  # verifier context window in tokens
    drafters: tuple[str, ...]  # configured drafter names
    name: str = ""  # the verifier's model name (what the HTTP API's /v1/models lists)


def _finite(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def validate_request(req: gen_pb.GenerateRequest, model: ModelInfo, limits: RequestLimits) -> None:
    """All checks that do not need the tokenizer. Raises InvalidRequest naming the field."""
    kind = req.WhichOneof("prompt")
    if kind is None:
        raise InvalidRequest("prompt", "required: set prompt.text or prompt.token_ids")
    if kind == "text":
        if not req.text:
            raise InvalidRequest("prompt.text", "must not be empty")
        if len(req.text) > limits.max_prompt_chars:
            raise InvalidRequest("prompt.text", f"longer than {limits.max_prompt_chars} characters")
    else:
        if not req.token_ids.ids:
            raise InvalidRequest("prompt.token_ids", "must not be empty")
        if req.chat:
            raise InvalidRequest("chat", "applies to prompt.text only, not to prompt.token_ids")

    s = req.sampling
    if s.HasField("temperature") and not (_finite(s.temperature) and s.temperature >= 0.0):
        raise InvalidRequest("sampling.temperature", f"must be a finite number >= 0, got {s.temperature}")
    if s.HasField("top_k") and s.top_k < 0:
        raise InvalidRequest("sampling.top_k", f"must be >= 0 (0 = off), got {s.top_k}")
    if s.HasField("top_p") and not (_finite(s.top_p) and 0.0 < s.top_p <= 1.0):
        raise InvalidRequest("sampling.top_p", f"must be in (0, 1], got {s.top_p}")

    rule = req.rule or limits.default_rule
    if rule not in RULES:
        raise InvalidRequest("rule", f"unknown rule {req.rule!r}; known: {', '.join(RULES)}")
    rp = req.rule_params
    if rp.HasField("delta") and not (_finite(rp.delta) and rp.delta >= 0.0):
        raise InvalidRequest("rule_params.delta", f"must be a finite number >= 0, got {rp.delta}")
    if rp.HasField("tas_epsilon") and not (_finite(rp.tas_epsilon) and 0.0 < rp.tas_epsilon <= 1.0):
        raise InvalidRequest("rule_params.tas_epsilon", f"must be in (0, 1], got {rp.tas_epsilon}")
    if rp.HasField("tas_alpha") and not (_finite(rp.tas_alpha) and rp.tas_alpha > 0.0):
        raise InvalidRequest("rule_params.tas_alpha", f"must be a finite number > 0, got {rp.tas_alpha}")

    seen: set[str] = set()
    for i, name in enumerate(req.drafters):
        if name not in model.drafters:
            known = ", ".join(model.drafters) or "(none configured)"
            raise InvalidRequest(f"drafters[{i}]", f"unknown drafter {name!r}; configured: {known}")
        if name in seen:
            raise InvalidRequest(f"drafters[{i}]", f"drafter {name!r} listed twice")
        seen.add(name)

    # 0 = no drafting: plain decoding through the same server (a baseline, or speculation off)
    if req.HasField("draft_length") and not (0 <= req.draft_length <= limits.max_draft_length):
        raise InvalidRequest(
            "draft_length", f"must be in [0, {limits.max_draft_length}], got {req.draft_length}"
        )
    _validate_tree(req, rule, limits)

    if req.HasField("max_new_tokens") and not (1 <= req.max_new_tokens <= limits.max_new_tokens):
        raise InvalidRequest(
            "max_new_tokens", f"must be in [1, {limits.max_new_tokens}], got {req.max_new_tokens}"
        )

    if len(req.stop) > limits.max_stop_sequences:
        raise InvalidRequest("stop", f"at most {limits.max_stop_sequences} stop sequences")
    for i, seq in enumerate(req.stop):
        if not seq:
            raise InvalidRequest(f"stop[{i}]", "must not be empty")
        if len(seq) > limits.max_stop_sequence_chars:
            raise InvalidRequest(f"stop[{i}]", f"longer than {limits.max_stop_sequence_chars} characters")
    _check_token_range("stop_token_ids", req.stop_token_ids, model.vocab_size)

    if len(req.session_id) > limits.max_session_id_chars:
        raise InvalidRequest("session_id", f"longer than {limits.max_session_id_chars} characters")


def _validate_tree(req: gen_pb.GenerateRequest, rule: str, limits: RequestLimits) -> None:
    branching = list(req.tree.branching)
    if not branching:
        return
    if len(branching) > limits.max_draft_length:
        raise InvalidRequest("tree.branching", f"deeper than max_draft_length {limits.max_draft_length}")
    if req.HasField("draft_length") and req.draft_length != len(branching):
        raise InvalidRequest(
            "draft_length", f"is {req.draft_length} but tree.branching has depth {len(branching)}"
        )
    nodes, width = 0, 1
    for i, k in enumerate(branching):
        if k < 1:
            raise InvalidRequest(f"tree.branching[{i}]", f"must be >= 1, got {k}")
        if rule == "spechub" and k > SPECHUB_MAX_BRANCHING:
            raise InvalidRequest(
                f"tree.branching[{i}]", f"spechub needs at most {SPECHUB_MAX_BRANCHING} children per node, got {k}"
            )
        width *= k
        nodes += width
        if nodes > limits.max_tree_nodes:
            raise InvalidRequest("tree.branching", f"more than max_tree_nodes {limits.max_tree_nodes} draft nodes")


def _check_token_range(field: str, ids: Sequence[int], vocab_size: int) -> None:
    for i, tok in enumerate(ids):
        if not (0 <= tok < vocab_size):
            raise InvalidRequest(f"{field}[{i}]", f"token id {tok} outside the vocabulary [0, {vocab_size})")


def validate_prompt_ids(
    req: gen_pb.GenerateRequest, prompt_ids: Sequence[int], model: ModelInfo, limits: RequestLimits
) -> int:
    """Check the tokenized prompt; returns the effective max_new_tokens (capped by the context window
    when the client did not set it)."""
    field = "prompt.text" if req.WhichOneof("prompt") == "text" else "prompt.token_ids"
    if not prompt_ids:
        raise InvalidRequest(field, "tokenizes to nothing")
    _check_token_range(field, prompt_ids, model.vocab_size)
    room = model.max_context - len(prompt_ids)
    if room < 1:
        raise InvalidRequest(
            field, f"{len(prompt_ids)} tokens leave no room in the {model.max_context}-token context"
        )
    if req.HasField("max_new_tokens"):
        if req.max_new_tokens > room:
            raise InvalidRequest(
                "max_new_tokens",
                f"{req.max_new_tokens} + {len(prompt_ids)} prompt tokens exceed the {model.max_context}-token context",
            )
        return req.max_new_tokens
    return min(limits.default_max_new_tokens, room)
