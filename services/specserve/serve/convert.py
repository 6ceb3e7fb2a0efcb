"""Protobuf <-> engine dataclasses.

Public side: `request_from_proto` turns a *validated* `GenerateRequest` into the engine's
`GenerationRequest`; the stats helpers fill the reply messages.

Internal side (router <-> drafters/verifier, proto/specserve/v1/internal.proto): DraftCall, DraftReply,
VerifyCall, VerifyReply and TokenTree, including draft probability rows; and the verifier replica's
rounds stream (RoundsCall in, a RoundReply per round out). How rows travel is chosen per
rule by `row_encoding_for_rule` (documented in internal.proto):

* OMIT  - greedy / tas never read the draft law, so no row crosses the wire. A decoded proposal then has
          `draft_probs=None` (which the tree contract reads as "deterministic"): harmless, these rules
          ignore it.
* EXACT - lossless rules need the exact law (a rounded d changes min(1, t/d) and the residual, so the output
          law would no longer be the verifier's). fp32, bit for bit; sparse (index + value of each non-zero)
          when that is smaller, which it is after top-k/top-p truncation.
* FP16  - lossy rules (cactus, mcsd-ti) already trade exactness for speed; fp16 halves the bytes.
"""

from __future__ import annotations

import numpy as np
import torch

from ..engine.types import LOSSY_RULES, GenerationRequest, GenerationStats, RoundResult, RuleParams
from ..engine.workers import AheadCall, AheadReply, AheadUnitTree, DraftCall, DraftReply, VerifyCall, VerifyReply
from ..sampling.params import SamplingParams
from ..tree.token_tree import ROOT, Proposal, TokenTree
from ..v1 import generation_pb2 as gen_pb
from ..v1 import internal_pb2 as int_pb

# ---------------------------------------------------------------- probability rows

ROWLESS_RULES = frozenset({"greedy", "tas"})  # never read a draft row

_COUPLING_TO_PB = {
    "independent": int_pb.COUPLING_INDEPENDENT,
    "without_replacement": int_pb.COUPLING_WITHOUT_REPLACEMENT,
    "hub": int_pb.COUPLING_HUB,
}
_COUPLING_FROM_PB = {v: k for k, v in _COUPLING_TO_PB.items()}


def row_encoding_for_rule(rule: str) -> int:
    """How draft rows travel for `rule` (an internal_pb2.RowEncoding value)."""
    if rule in ROWLESS_RULES:
        return int_pb.ROW_ENCODING_OMIT
    if rule in LOSSY_RULES:
        return int_pb.ROW_ENCODING_FP16
    return int_pb.ROW_ENCODING_EXACT


def row_to_proto(row: torch.Tensor, encoding: int = int_pb.ROW_ENCODING_EXACT) -> int_pb.ProbRow:
    """A [V] probability row as sparse or dense bytes, whichever is smaller."""
    values = row.detach().to("cpu", torch.float32).numpy()
    dtype = np.float16 if encoding == int_pb.ROW_ENCODING_FP16 else np.float32
    nonzero = np.flatnonzero(values)
    value_bytes = np.dtype(dtype).itemsize
    sparse = len(nonzero) * (4 + value_bytes) < len(values) * value_bytes
    msg = int_pb.ProbRow(
        vocab_size=len(values),
        dtype=int_pb.ROW_DTYPE_FP16 if dtype is np.float16 else int_pb.ROW_DTYPE_FP32,
        sparse=sparse,
    )
    if sparse:
        msg.indices = nonzero.astype("<i4").tobytes()
        msg.values = values[nonzero].astype(np.dtype(dtype).newbyteorder("<")).tobytes()
    else:
        msg.values = values.astype(np.dtype(dtype).newbyteorder("<")).tobytes()
    return msg


def row_from_proto(msg: int_pb.ProbRow) -> torch.Tensor:
    """Back to a [V] fp32 tensor (exact for fp32 rows)."""
    dtype = np.dtype(np.float16 if msg.dtype == int_pb.ROW_DTYPE_FP16 else np.float32).newbyteorder("<")
    values = np.frombuffer(msg.values, dtype=dtype).astype(np.float32)
    if not msg.sparse:
        if len(values) != msg.vocab_size:
            raise ValueError(f"dense row has {len(values)} values, vocab_size is {msg.vocab_size}")
        return torch.from_numpy(values.copy())
    indices = np.frombuffer(msg.indices, dtype="<i4")
    if len(indices) != len(values):
        raise ValueError("sparse row: indices and values differ in length")
    if len(indices) and (indices.min() < 0 or indices.max() >= msg.vocab_size):
        raise ValueError("sparse row: index outside the vocabulary")
    row = np.zeros(msg.vocab_size, dtype=np.float32)  # numpy: no torch intra-op thread start-up per row
    row[indices] = values
    return torch.from_numpy(row)


# ---------------------------------------------------------------- token trees


def tree_to_proto(tree: TokenTree, encoding: int = int_pb.ROW_ENCODING_EXACT) -> int_pb.TokenTree:
    msg = int_pb.TokenTree(tokens=tree.tokens, parents=tree.parents)
    row_index: dict[int, int] = {}  # id(tensor) -> 1 + index: a row shared by siblings is sent once
    parents = sorted(set(tree.proposals) | set(tree.coupling) | set(tree.hub_token))
    for parent in parents:
        branch = msg.branches.add(parent=parent)
        if parent in tree.coupling:
            branch.coupling = _COUPLING_TO_PB[tree.coupling[parent]]
            branch.has_coupling = True
        if parent in tree.hub_token:
            branch.hub_token = tree.hub_token[parent]
        for prop in tree.proposals.get(parent, []):
            row = 0
            if prop.draft_probs is not None and encoding != int_pb.ROW_ENCODING_OMIT:
                key = id(prop.draft_probs)
                if key not in row_index:
                    msg.rows.append(row_to_proto(prop.draft_probs, encoding))
                    row_index[key] = len(msg.rows)
                row = row_index[key]
            branch.proposals.add(child=prop.child, drafter=prop.drafter, row=row)
    return msg


def tree_from_proto(msg: int_pb.TokenTree) -> TokenTree:
    if len(msg.tokens) != len(msg.parents):
        raise ValueError("tree: tokens and parents differ in length")
    rows = [row_from_proto(r) for r in msg.rows]
    tree = TokenTree()
    for i, (token, parent) in enumerate(zip(msg.tokens, msg.parents)):
        if not (parent == ROOT or 0 <= parent < i):
            raise ValueError(f"tree: node {i} has parent {parent}; nodes must be in topological order")
        tree.add_node(parent, token)
    for branch in msg.branches:
        for prop in branch.proposals:
            if not (0 <= prop.child < len(tree)) or tree.parents[prop.child] != branch.parent:
                raise ValueError(f"tree: proposal child {prop.child} is not a child of {branch.parent}")
            if not (0 <= prop.row <= len(rows)):
                raise ValueError(f"tree: proposal row {prop.row} out of range")
            row = rows[prop.row - 1] if prop.row else None
            tree.proposals.setdefault(branch.parent, []).append(Proposal(prop.child, row, prop.drafter))
        if branch.has_coupling:
            tree.coupling[branch.parent] = _COUPLING_FROM_PB[branch.coupling]
        if branch.HasField("hub_token"):
            tree.hub_token[branch.parent] = branch.hub_token
    return tree


# ---------------------------------------------------------------- internal calls


def _sampling_to_proto(p: SamplingParams) -> int_pb.SamplingParams:
    return int_pb.SamplingParams(temperature=p.temperature, top_k=p.top_k, top_p=p.top_p)


def _sampling_from_proto(m: int_pb.SamplingParams) -> SamplingParams:
    return SamplingParams(temperature=m.temperature, top_k=m.top_k, top_p=m.top_p)


def _rule_params_to_proto(rp: RuleParams) -> int_pb.RuleParams:
    return int_pb.RuleParams(delta=rp.delta, tas_epsilon=rp.tas_epsilon, tas_alpha=rp.tas_alpha)


def _rule_params_from_proto(m: int_pb.RuleParams) -> RuleParams:
    return RuleParams(delta=m.delta, tas_epsilon=m.tas_epsilon, tas_alpha=m.tas_alpha)


def draft_call_to_proto(call: DraftCall, row_encoding: int = int_pb.ROW_ENCODING_EXACT) -> int_pb.DraftCall:
    return int_pb.DraftCall(
        session_id=call.session_id,
        committed=call.committed,
        num_tokens=call.num_tokens,
        sampling=_sampling_to_proto(call.sampling),
        seed=call.seed,
        tree_config=list(call.tree_config or ()),
        coupling=_COUPLING_TO_PB[call.coupling],
        row_encoding=row_encoding,
        roots=list(call.roots or ()),
        has_roots=call.roots is not None,
        verify_window_s=call.verify_window_s,
        min_confidence=call.min_confidence,
        alternatives=call.alternatives,
    )


def draft_call_from_proto(msg: int_pb.DraftCall) -> DraftCall:
    """The row encoding the router asked for stays in `msg.row_encoding` (pass it to draft_reply_to_proto)."""
    return DraftCall(
        session_id=msg.session_id,
        committed=list(msg.committed),
        num_tokens=msg.num_tokens,
        sampling=_sampling_from_proto(msg.sampling),
        seed=msg.seed,
        tree_config=tuple(msg.tree_config) or None,
        coupling=_COUPLING_FROM_PB[msg.coupling],
        roots=list(msg.roots) if msg.has_roots else None,
        verify_window_s=msg.verify_window_s,
        min_confidence=msg.min_confidence,
        alternatives=msg.alternatives,
    )


def ahead_call_to_proto(call: AheadCall, row_encoding: int = int_pb.ROW_ENCODING_EXACT) -> int_pb.AheadCall:
    return int_pb.AheadCall(
        session_id=call.session_id,
        committed=call.committed,
        chain=call.chain,
        fanout=call.fanout,
        num_tokens=call.num_tokens,
        sampling=_sampling_to_proto(call.sampling),
        seed=call.seed,
        stamp=call.stamp,
        row_encoding=row_encoding,
        deadline_s=call.deadline_s,
        parents=call.parents,
    )


def ahead_call_from_proto(msg: int_pb.AheadCall) -> AheadCall:
    return AheadCall(
        session_id=msg.session_id,
        committed=list(msg.committed),
        chain=list(msg.chain),
        fanout=list(msg.fanout),
        num_tokens=msg.num_tokens,
        sampling=_sampling_from_proto(msg.sampling),
        seed=msg.seed,
        stamp=msg.stamp,
        deadline_s=msg.deadline_s,
        parents=list(msg.parents),
    )


def ahead_reply_to_proto(reply: AheadReply, row_encoding: int = int_pb.ROW_ENCODING_EXACT) -> int_pb.AheadReply:
    return int_pb.AheadReply(
        stamp=reply.stamp,
        units=[int_pb.AheadUnit(accepted=u.accepted, bonus=u.bonus, tree=tree_to_proto(u.tree, row_encoding))
               for u in reply.units],
        drafter=reply.drafter,
        seconds=reply.seconds,
    )


def ahead_reply_from_proto(msg: int_pb.AheadReply) -> AheadReply:
    return AheadReply(
        stamp=msg.stamp,
        units=[AheadUnitTree(u.accepted, u.bonus, tree_from_proto(u.tree)) for u in msg.units],
        drafter=msg.drafter,
        seconds=msg.seconds,
    )


def draft_reply_to_proto(reply: DraftReply, row_encoding: int = int_pb.ROW_ENCODING_EXACT) -> int_pb.DraftReply:
    return int_pb.DraftReply(
        tree=tree_to_proto(reply.tree, row_encoding), drafter=reply.drafter, seconds=reply.seconds
    )


def draft_reply_from_proto(msg: int_pb.DraftReply) -> DraftReply:
    return DraftReply(tree=tree_from_proto(msg.tree), drafter=msg.drafter, seconds=msg.seconds)


def verify_call_to_proto(call: VerifyCall) -> int_pb.VerifyCall:
    return int_pb.VerifyCall(
        session_id=call.session_id,
        committed=call.committed,
        tree=tree_to_proto(call.tree, row_encoding_for_rule(call.rule)),
        sampling=_sampling_to_proto(call.sampling),
        rule=call.rule,
        rule_params=_rule_params_to_proto(call.rule_params),
        seed=call.seed,
        ti_width=call.ti_width,
        want_depth=call.want_depth,
        accept_rates=call.accept_rates,
        draft_seconds=call.draft_seconds,
        catch_up_seconds=call.catch_up_seconds,
        catch_up_rounds=call.catch_up_rounds,
    )


def verify_call_from_proto(msg: int_pb.VerifyCall) -> VerifyCall:
    return VerifyCall(
        session_id=msg.session_id,
        committed=list(msg.committed),
        tree=tree_from_proto(msg.tree),
        sampling=_sampling_from_proto(msg.sampling),
        rule=msg.rule,
        rule_params=_rule_params_from_proto(msg.rule_params),
        seed=msg.seed,
        ti_width=msg.ti_width,
        want_depth=msg.want_depth,
        accept_rates=tuple(msg.accept_rates),
        draft_seconds=msg.draft_seconds,
        catch_up_seconds=msg.catch_up_seconds,
        catch_up_rounds=msg.catch_up_rounds,
    )


def verify_reply_to_proto(reply: VerifyReply) -> int_pb.VerifyReply:
    return int_pb.VerifyReply(
        tokens=reply.tokens,
        path=reply.path,
        accepted_by_drafter=reply.accepted_by_drafter,
        seconds=reply.seconds,
        next_roots=reply.next_roots,
        depth_cap=reply.depth_cap,
        explore=reply.explore,
    )


def verify_reply_from_proto(msg: int_pb.VerifyReply) -> VerifyReply:
    return VerifyReply(
        tokens=list(msg.tokens),
        path=list(msg.path),
        accepted_by_drafter=dict(msg.accepted_by_drafter),
        seconds=msg.seconds,
        next_roots=list(msg.next_roots),
        depth_cap=msg.depth_cap,
        explore=msg.explore,
    )


def rounds_call_to_proto(request: GenerationRequest) -> int_pb.RoundsCall:
    """A whole request for a verifier replica's decode loop (round_driver "verifier")."""
    msg = int_pb.RoundsCall(
        prompt_ids=request.prompt_ids,
        max_new_tokens=request.max_new_tokens,
        sampling=_sampling_to_proto(request.sampling),
        rule=request.rule,
        rule_params=_rule_params_to_proto(request.rule_params),
        draft_length=request.draft_length,
        tree_config=request.tree_config or (),
        has_drafters=request.drafters is not None,
        drafters=request.drafters or (),
        stop_token_ids=request.stop_token_ids,
        session_id=request.session_id,
    )
    if request.seed is not None:
        msg.seed = request.seed
    return msg


def rounds_call_from_proto(msg: int_pb.RoundsCall) -> GenerationRequest:
    return GenerationRequest(
        prompt_ids=list(msg.prompt_ids),
        max_new_tokens=msg.max_new_tokens,
        sampling=_sampling_from_proto(msg.sampling),
        rule=msg.rule,
        rule_params=_rule_params_from_proto(msg.rule_params),
        draft_length=msg.draft_length,
        tree_config=tuple(msg.tree_config) or None,
        drafters=tuple(msg.drafters) if msg.has_drafters else None,
        seed=msg.seed if msg.HasField("seed") else None,
        stop_token_ids=tuple(msg.stop_token_ids),
        session_id=msg.session_id,
    )


def round_reply_to_proto(r: RoundResult) -> int_pb.RoundReply:
    return int_pb.RoundReply(
        tokens=r.tokens,
        num_drafted=r.num_drafted,
        num_accepted=r.num_accepted,
        accepted_by_drafter=r.accepted_by_drafter,
        drafted_by_drafter=r.drafted_by_drafter,
        finished=r.finished,
        finish_reason=r.finish_reason,
        draft_seconds=r.draft_seconds,
        verify_seconds=r.verify_seconds,
        drafted_depth=r.drafted_depth,
        drafted_ahead=r.drafted_ahead,
        ahead_status=r.ahead_status,
    )


def round_reply_from_proto(msg: int_pb.RoundReply) -> RoundResult:
    return RoundResult(
        tokens=list(msg.tokens),
        num_drafted=msg.num_drafted,
        num_accepted=msg.num_accepted,
        accepted_by_drafter=dict(msg.accepted_by_drafter),
        drafted_by_drafter=dict(msg.drafted_by_drafter),
        finished=msg.finished,
        finish_reason=msg.finish_reason,
        draft_seconds=msg.draft_seconds,
        verify_seconds=msg.verify_seconds,
        drafted_depth=msg.drafted_depth,
        drafted_ahead=msg.drafted_ahead,
        ahead_status=msg.ahead_status,
    )


# ---------------------------------------------------------------- public API


def request_from_proto(
    req: gen_pb.GenerateRequest,
    prompt_ids: list[int],
    *,
    default_max_new_tokens: int,
    default_rule: str,
    default_draft_length: int,
    session_id: str,
    stop_token_ids: tuple[int, ...],
) -> GenerationRequest:
    """A validated request (serve/validation.py) -> the engine's request. Unset fields get defaults."""
    s = req.sampling
    sampling = SamplingParams(
        temperature=s.temperature if s.HasField("temperature") else 0.0,
        top_k=s.top_k if s.HasField("top_k") else 0,
        top_p=s.top_p if s.HasField("top_p") else 1.0,
    )
    defaults = RuleParams()
    rp = req.rule_params
    rule_params = RuleParams(
        delta=rp.delta if rp.HasField("delta") else defaults.delta,
        tas_epsilon=rp.tas_epsilon if rp.HasField("tas_epsilon") else defaults.tas_epsilon,
        tas_alpha=rp.tas_alpha if rp.HasField("tas_alpha") else defaults.tas_alpha,
    )
    tree_config = tuple(req.tree.branching) or None
    draft_length = req.draft_length if req.HasField("draft_length") else default_draft_length
    if tree_config is not None:
        draft_length = len(tree_config)  # a k-config tree fixes the depth
    return GenerationRequest(
        prompt_ids=list(prompt_ids),
        max_new_tokens=req.max_new_tokens if req.HasField("max_new_tokens") else default_max_new_tokens,
        sampling=sampling,
        rule=req.rule or default_rule,
        rule_params=rule_params,
        draft_length=draft_length,
        tree_config=tree_config,
        drafters=tuple(req.drafters) or None,
        seed=req.seed if req.HasField("seed") else None,
        stop_token_ids=stop_token_ids,
        session_id=session_id,
    )


def round_stats_to_proto(r: RoundResult) -> gen_pb.RoundStats:
    return gen_pb.RoundStats(
        num_drafted=r.num_drafted,
        num_accepted=r.num_accepted,
        drafted_by_drafter=r.drafted_by_drafter,
        accepted_by_drafter=r.accepted_by_drafter,
        draft_seconds=r.draft_seconds,
        verify_seconds=r.verify_seconds,
    )


def stats_to_proto(
    stats: GenerationStats, *, prompt_tokens: int, rule: str, ttft_seconds: float
) -> gen_pb.GenerationStats:
    msg = gen_pb.GenerationStats(
        prompt_tokens=prompt_tokens,
        generated_tokens=stats.generated,
        rounds=stats.rounds,
        drafted=stats.drafted,
        accepted=stats.accepted,
        tokens_per_step=stats.tokens_per_step,
        mean_accepted_length=stats.mean_accepted_length,
        acceptance_rate=stats.accepted / stats.drafted if stats.drafted else 0.0,
        accepted_per_position=stats.accepted_per_position,
        drafted_per_position=stats.drafted_per_position,
        timings=gen_pb.Timings(
            total_seconds=stats.seconds,
            time_to_first_token_seconds=ttft_seconds,
            draft_seconds=stats.draft_seconds,
            verify_seconds=stats.verify_seconds,
        ),
        rule=rule,
        lossy=rule in LOSSY_RULES,
        drafting_ahead=stats.ahead_outcomes,
    )
    for name in sorted(set(stats.drafted_by_drafter) | set(stats.accepted_by_drafter)):
        drafted = stats.drafted_by_drafter.get(name, 0)
        accepted = stats.accepted_by_drafter.get(name, 0)
        msg.drafters[name].CopyFrom(
            gen_pb.DrafterStats(
                drafted=drafted, accepted=accepted, acceptance_rate=accepted / drafted if drafted else 0.0
            )
        )
    return msg
