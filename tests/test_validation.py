"""serve/validation.py without a server: each bad field is named; good requests pass; limits config."""

import pydantic
import pytest

from specserve.serve.validation import (
    InvalidRequest,
    ModelInfo,
    RequestLimits,
    validate_prompt_ids,
    validate_request,
)
from specserve.v1 import generation_pb2 as gen_pb

MODEL = ModelInfo(vocab_size=100, max_context=64, drafters=("ngram", "small"))
LIMITS = RequestLimits(max_new_tokens=50, default_max_new_tokens=16, max_draft_length=6, max_tree_nodes=20)


def test_a_full_good_request_passes():
    req = gen_pb.GenerateRequest(
        text="hi", rule="spechub", drafters=["small"], max_new_tokens=50, seed=3, stop=["\n"],
        stop_token_ids=[99], session_id="abc",
    )
    req.sampling.temperature, req.sampling.top_k, req.sampling.top_p = 0.7, 40, 0.95
    req.rule_params.delta = 0.0
    req.tree.branching.extend([2, 2, 1])
    validate_request(req, MODEL, LIMITS)
    assert validate_prompt_ids(req, [1, 2, 3], MODEL, LIMITS) == 50


@pytest.mark.parametrize(
    "field, build",
    [
        ("rule_params.tas_alpha", lambda r: setattr(r.rule_params, "tas_alpha", float("inf"))),
        ("draft_length", lambda r: setattr(r, "draft_length", 7)),
        ("draft_length", lambda r: setattr(r, "draft_length", -1)),
        ("draft_length", lambda r: (setattr(r, "draft_length", 2), r.tree.branching.extend([1, 1, 1]))),
        ("tree.branching", lambda r: r.tree.branching.extend([1] * 7)),
        ("tree.branching", lambda r: r.tree.branching.extend([4, 5])),  # 4 + 20 > 20 nodes
        ("stop", lambda r: r.stop.extend(["x"] * 17)),
        ("stop[0]", lambda r: r.stop.append("y" * 257)),
        ("session_id", lambda r: setattr(r, "session_id", "s" * 129)),
    ],
)
def test_bad_fields_are_named(field, build):
    req = gen_pb.GenerateRequest(text="hi")
    build(req)
    with pytest.raises(InvalidRequest) as err:
        validate_request(req, MODEL, LIMITS)
    assert err.value.field == field and str(err.value).startswith(field + ": ")


def test_prompt_length_against_the_context():
    req = gen_pb.GenerateRequest(text="hi")
    assert validate_prompt_ids(req, [1] * 60, MODEL, LIMITS) == 4  # default capped by the room left
    with pytest.raises(InvalidRequest, match="^prompt.text: 64 tokens leave no room"):
        validate_prompt_ids(req, [1] * 64, MODEL, LIMITS)
    req.max_new_tokens = 5
    with pytest.raises(InvalidRequest, match="^max_new_tokens:"):
        validate_prompt_ids(req, [1] * 60, MODEL, LIMITS)
    ids_req = gen_pb.GenerateRequest(token_ids=gen_pb.TokenIds(ids=[1, 100]))
    with pytest.raises(InvalidRequest, match=r"^prompt.token_ids\[1\]: token id 100 outside"):
        validate_prompt_ids(ids_req, [1, 100], MODEL, LIMITS)


def test_unset_means_default_but_explicit_zero_is_rejected():
    req = gen_pb.GenerateRequest(text="hi")
    validate_request(req, MODEL, LIMITS)  # nothing set: all defaults
    req.sampling.top_p = 0.0
    with pytest.raises(InvalidRequest, match="^sampling.top_p"):
        validate_request(req, MODEL, LIMITS)


def test_limits_config_is_checked():
    with pytest.raises(pydantic.ValidationError, match="default_rule"):
        RequestLimits(default_rule="nope")
    with pytest.raises(pydantic.ValidationError, match="default_max_new_tokens"):
        RequestLimits(max_new_tokens=10, default_max_new_tokens=20)
    with pytest.raises(pydantic.ValidationError):
        RequestLimits(max_draft_length=0)
