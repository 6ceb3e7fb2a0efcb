from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Coupling(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COUPLING_INDEPENDENT: _ClassVar[Coupling]
    COUPLING_WITHOUT_REPLACEMENT: _ClassVar[Coupling]
    COUPLING_HUB: _ClassVar[Coupling]

class RowEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROW_ENCODING_EXACT: _ClassVar[RowEncoding]
    ROW_ENCODING_FP16: _ClassVar[RowEncoding]
    ROW_ENCODING_OMIT: _ClassVar[RowEncoding]

class RowDType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROW_DTYPE_FP32: _ClassVar[RowDType]
    ROW_DTYPE_FP16: _ClassVar[RowDType]
COUPLING_INDEPENDENT: Coupling
COUPLING_WITHOUT_REPLACEMENT: Coupling
COUPLING_HUB: Coupling
ROW_ENCODING_EXACT: RowEncoding
ROW_ENCODING_FP16: RowEncoding
ROW_ENCODING_OMIT: RowEncoding
ROW_DTYPE_FP32: RowDType
ROW_DTYPE_FP16: RowDType

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_k", "top_p")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_k: int
    top_p: float
    def __init__(self, temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ...) -> None: ...

class RuleParams(_message.Message):
    __slots__ = ("delta", "tas_epsilon", "tas_alpha")
    DELTA_FIELD_NUMBER: _ClassVar[int]
    TAS_EPSILON_FIELD_NUMBER: _ClassVar[int]
    TAS_ALPHA_FIELD_NUMBER: _ClassVar[int]
    delta: float
    tas_epsilon: float
    tas_alpha: float
    def __init__(self, delta: _Optional[float] = ..., tas_epsilon: _Optional[float] = ..., tas_alpha: _Optional[float] = ...) -> None: ...

class ProbRow(_message.Message):
    __slots__ = ("vocab_size", "dtype", "values", "indices", "sparse")
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    SPARSE_FIELD_NUMBER: _ClassVar[int]
    vocab_size: int
    dtype: RowDType
    values: bytes
    indices: bytes
    sparse: bool
    def __init__(self, vocab_size: _Optional[int] = ..., dtype: _Optional[_Union[RowDType, str]] = ..., values: _Optional[bytes] = ..., indices: _Optional[bytes] = ..., sparse: _Optional[bool] = ...) -> None: ...

class Proposal(_message.Message):
    __slots__ = ("child", "drafter", "row")
    CHILD_FIELD_NUMBER: _ClassVar[int]
    DRAFTER_FIELD_NUMBER: _ClassVar[int]
    ROW_FIELD_NUMBER: _ClassVar[int]
    child: int
    drafter: str
    row: int
    def __init__(self, child: _Optional[int] = ..., drafter: _Optional[str] = ..., row: _Optional[int] = ...) -> None: ...

class Branch(_message.Message):
    __slots__ = ("parent", "proposals", "coupling", "has_coupling", "hub_token")
    PARENT_FIELD_NUMBER: _ClassVar[int]
    PROPOSALS_FIELD_NUMBER: _ClassVar[int]
    COUPLING_FIELD_NUMBER: _ClassVar[int]
    HAS_COUPLING_FIELD_NUMBER: _ClassVar[int]
    HUB_TOKEN_FIELD_NUMBER: _ClassVar[int]
    parent: int
    proposals: _containers.RepeatedCompositeFieldContainer[Proposal]
    coupling: Coupling
    has_coupling: bool
    hub_token: int
    def __init__(self, parent: _Optional[int] = ..., proposals: _Optional[_Iterable[_Union[Proposal, _Mapping]]] = ..., coupling: _Optional[_Union[Coupling, str]] = ..., has_coupling: _Optional[bool] = ..., hub_token: _Optional[int] = ...) -> None: ...

class TokenTree(_message.Message):
    __slots__ = ("tokens", "parents", "branches", "rows")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    PARENTS_FIELD_NUMBER: _ClassVar[int]
    BRANCHES_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedScalarFieldContainer[int]
    parents: _containers.RepeatedScalarFieldContainer[int]
    branches: _containers.RepeatedCompositeFieldContainer[Branch]
    rows: _containers.RepeatedCompositeFieldContainer[ProbRow]
    def __init__(self, tokens: _Optional[_Iterable[int]] = ..., parents: _Optional[_Iterable[int]] = ..., branches: _Optional[_Iterable[_Union[Branch, _Mapping]]] = ..., rows: _Optional[_Iterable[_Union[ProbRow, _Mapping]]] = ...) -> None: ...

class DraftCall(_message.Message):
    __slots__ = ("session_id", "committed", "num_tokens", "sampling", "seed", "tree_config", "coupling", "row_encoding", "roots", "has_roots", "verify_window_s", "min_confidence", "alternatives")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TREE_CONFIG_FIELD_NUMBER: _ClassVar[int]
    COUPLING_FIELD_NUMBER: _ClassVar[int]
    ROW_ENCODING_FIELD_NUMBER: _ClassVar[int]
    ROOTS_FIELD_NUMBER: _ClassVar[int]
    HAS_ROOTS_FIELD_NUMBER: _ClassVar[int]
    VERIFY_WINDOW_S_FIELD_NUMBER: _ClassVar[int]
    MIN_CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    ALTERNATIVES_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    committed: _containers.RepeatedScalarFieldContainer[int]
    num_tokens: int
    sampling: SamplingParams
    seed: int
    tree_config: _containers.RepeatedScalarFieldContainer[int]
    coupling: Coupling
    row_encoding: RowEncoding
    roots: _containers.RepeatedScalarFieldContainer[int]
    has_roots: bool
    verify_window_s: float
    min_confidence: float
    alternatives: int
    def __init__(self, session_id: _Optional[str] = ..., committed: _Optional[_Iterable[int]] = ..., num_tokens: _Optional[int] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., seed: _Optional[int] = ..., tree_config: _Optional[_Iterable[int]] = ..., coupling: _Optional[_Union[Coupling, str]] = ..., row_encoding: _Optional[_Union[RowEncoding, str]] = ..., roots: _Optional[_Iterable[int]] = ..., has_roots: _Optional[bool] = ..., verify_window_s: _Optional[float] = ..., min_confidence: _Optional[float] = ..., alternatives: _Optional[int] = ...) -> None: ...

class AheadCall(_message.Message):
    __slots__ = ("session_id", "committed", "chain", "fanout", "num_tokens", "sampling", "seed", "stamp", "row_encoding", "deadline_s", "parents")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_FIELD_NUMBER: _ClassVar[int]
    CHAIN_FIELD_NUMBER: _ClassVar[int]
    FANOUT_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STAMP_FIELD_NUMBER: _ClassVar[int]
    ROW_ENCODING_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_S_FIELD_NUMBER: _ClassVar[int]
    PARENTS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    committed: _containers.RepeatedScalarFieldContainer[int]
    chain: _containers.RepeatedScalarFieldContainer[int]
    fanout: _containers.RepeatedScalarFieldContainer[int]
    num_tokens: int
    sampling: SamplingParams
    seed: int
    stamp: str
    row_encoding: RowEncoding
    deadline_s: float
    parents: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, session_id: _Optional[str] = ..., committed: _Optional[_Iterable[int]] = ..., chain: _Optional[_Iterable[int]] = ..., fanout: _Optional[_Iterable[int]] = ..., num_tokens: _Optional[int] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., seed: _Optional[int] = ..., stamp: _Optional[str] = ..., row_encoding: _Optional[_Union[RowEncoding, str]] = ..., deadline_s: _Optional[float] = ..., parents: _Optional[_Iterable[int]] = ...) -> None: ...

class AheadUnit(_message.Message):
    __slots__ = ("accepted", "bonus", "tree")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    BONUS_FIELD_NUMBER: _ClassVar[int]
    TREE_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    bonus: int
    tree: TokenTree
    def __init__(self, accepted: _Optional[int] = ..., bonus: _Optional[int] = ..., tree: _Optional[_Union[TokenTree, _Mapping]] = ...) -> None: ...

class AheadReply(_message.Message):
    __slots__ = ("stamp", "units", "drafter", "seconds")
    STAMP_FIELD_NUMBER: _ClassVar[int]
    UNITS_FIELD_NUMBER: _ClassVar[int]
    DRAFTER_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    stamp: str
    units: _containers.RepeatedCompositeFieldContainer[AheadUnit]
    drafter: str
    seconds: float
    def __init__(self, stamp: _Optional[str] = ..., units: _Optional[_Iterable[_Union[AheadUnit, _Mapping]]] = ..., drafter: _Optional[str] = ..., seconds: _Optional[float] = ...) -> None: ...

class DraftReply(_message.Message):
    __slots__ = ("tree", "drafter", "seconds")
    TREE_FIELD_NUMBER: _ClassVar[int]
    DRAFTER_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    tree: TokenTree
    drafter: str
    seconds: float
    def __init__(self, tree: _Optional[_Union[TokenTree, _Mapping]] = ..., drafter: _Optional[str] = ..., seconds: _Optional[float] = ...) -> None: ...

class VerifyCall(_message.Message):
    __slots__ = ("session_id", "committed", "tree", "sampling", "rule", "rule_params", "seed", "ti_width", "want_depth", "accept_rates", "draft_seconds", "catch_up_seconds", "catch_up_rounds")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_FIELD_NUMBER: _ClassVar[int]
    TREE_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    RULE_PARAMS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TI_WIDTH_FIELD_NUMBER: _ClassVar[int]
    WANT_DEPTH_FIELD_NUMBER: _ClassVar[int]
    ACCEPT_RATES_FIELD_NUMBER: _ClassVar[int]
    DRAFT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CATCH_UP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CATCH_UP_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    committed: _containers.RepeatedScalarFieldContainer[int]
    tree: TokenTree
    sampling: SamplingParams
    rule: str
    rule_params: RuleParams
    seed: int
    ti_width: int
    want_depth: int
    accept_rates: _containers.RepeatedScalarFieldContainer[float]
    draft_seconds: float
    catch_up_seconds: float
    catch_up_rounds: float
    def __init__(self, session_id: _Optional[str] = ..., committed: _Optional[_Iterable[int]] = ..., tree: _Optional[_Union[TokenTree, _Mapping]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., rule: _Optional[str] = ..., rule_params: _Optional[_Union[RuleParams, _Mapping]] = ..., seed: _Optional[int] = ..., ti_width: _Optional[int] = ..., want_depth: _Optional[int] = ..., accept_rates: _Optional[_Iterable[float]] = ..., draft_seconds: _Optional[float] = ..., catch_up_seconds: _Optional[float] = ..., catch_up_rounds: _Optional[float] = ...) -> None: ...

class VerifyReply(_message.Message):
    __slots__ = ("tokens", "path", "accepted_by_drafter", "seconds", "next_roots", "depth_cap", "explore")
    class AcceptedByDrafterEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_BY_DRAFTER_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    NEXT_ROOTS_FIELD_NUMBER: _ClassVar[int]
    DEPTH_CAP_FIELD_NUMBER: _ClassVar[int]
    EXPLORE_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedScalarFieldContainer[int]
    path: _containers.RepeatedScalarFieldContainer[int]
    accepted_by_drafter: _containers.ScalarMap[str, int]
    seconds: float
    next_roots: _containers.RepeatedScalarFieldContainer[int]
    depth_cap: int
    explore: bool
    def __init__(self, tokens: _Optional[_Iterable[int]] = ..., path: _Optional[_Iterable[int]] = ..., accepted_by_drafter: _Optional[_Mapping[str, int]] = ..., seconds: _Optional[float] = ..., next_roots: _Optional[_Iterable[int]] = ..., depth_cap: _Optional[int] = ..., explore: _Optional[bool] = ...) -> None: ...

class RoundsCall(_message.Message):
    __slots__ = ("prompt_ids", "max_new_tokens", "sampling", "rule", "rule_params", "draft_length", "tree_config", "has_drafters", "drafters", "seed", "stop_token_ids", "session_id")
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    RULE_PARAMS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    TREE_CONFIG_FIELD_NUMBER: _ClassVar[int]
    HAS_DRAFTERS_FIELD_NUMBER: _ClassVar[int]
    DRAFTERS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    prompt_ids: _containers.RepeatedScalarFieldContainer[int]
    max_new_tokens: int
    sampling: SamplingParams
    rule: str
    rule_params: RuleParams
    draft_length: int
    tree_config: _containers.RepeatedScalarFieldContainer[int]
    has_drafters: bool
    drafters: _containers.RepeatedScalarFieldContainer[str]
    seed: int
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    session_id: str
    def __init__(self, prompt_ids: _Optional[_Iterable[int]] = ..., max_new_tokens: _Optional[int] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., rule: _Optional[str] = ..., rule_params: _Optional[_Union[RuleParams, _Mapping]] = ..., draft_length: _Optional[int] = ..., tree_config: _Optional[_Iterable[int]] = ..., has_drafters: _Optional[bool] = ..., drafters: _Optional[_Iterable[str]] = ..., seed: _Optional[int] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., session_id: _Optional[str] = ...) -> None: ...

class RoundReply(_message.Message):
    __slots__ = ("tokens", "num_drafted", "num_accepted", "accepted_by_drafter", "drafted_by_drafter", "finished", "finish_reason", "draft_seconds", "verify_seconds", "drafted_depth", "drafted_ahead", "ahead_status")
    class AcceptedByDrafterEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class DraftedByDrafterEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_DRAFTED_FIELD_NUMBER: _ClassVar[int]
    NUM_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_BY_DRAFTER_FIELD_NUMBER: _ClassVar[int]
    DRAFTED_BY_DRAFTER_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    DRAFT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    VERIFY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DRAFTED_DEPTH_FIELD_NUMBER: _ClassVar[int]
    DRAFTED_AHEAD_FIELD_NUMBER: _ClassVar[int]
    AHEAD_STATUS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedScalarFieldContainer[int]
    num_drafted: int
    num_accepted: int
    accepted_by_drafter: _containers.ScalarMap[str, int]
    drafted_by_drafter: _containers.ScalarMap[str, int]
    finished: bool
    finish_reason: str
    draft_seconds: float
    verify_seconds: float
    drafted_depth: int
    drafted_ahead: bool
    ahead_status: str
    def __init__(self, tokens: _Optional[_Iterable[int]] = ..., num_drafted: _Optional[int] = ..., num_accepted: _Optional[int] = ..., accepted_by_drafter: _Optional[_Mapping[str, int]] = ..., drafted_by_drafter: _Optional[_Mapping[str, int]] = ..., finished: _Optional[bool] = ..., finish_reason: _Optional[str] = ..., draft_seconds: _Optional[float] = ..., verify_seconds: _Optional[float] = ..., drafted_depth: _Optional[int] = ..., drafted_ahead: _Optional[bool] = ..., ahead_status: _Optional[str] = ...) -> None: ...
