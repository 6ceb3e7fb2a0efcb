"""A transformers causal LM with per-session KV caches: the verifier backend and the base of LM drafters.

Cache convention (models/base.py): at rest a session's DynamicCache holds `committed[:-1]`;
the last committed token is *pending*. A verification pass feeds `[pending] + tree.tokens` in
ONE forward with a 4-D attention mask (the cached prefix is visible to every row, a tree row sees
only its ancestors and itself) and position ids by depth, so row 0 of the result is the law after
the committed text and row 1 + i the law after tree node i. `commit` keeps only the accepted
path's KV rows (index_select along the sequence axis), so nothing is recomputed.

Sessions are lazy: `sync` and `commit` only record what the cache should hold; the forward that
brings the cache up to date runs when logits are actually asked for.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, DynamicCache
from transformers.cache_utils import DynamicLayer

from ..sampling.params import SamplingParams, greedy_token, process_logits
from ..tree.token_tree import ROOT, TokenTree
from .attention import NAME as ATTENTION  # registers the GQA-packing sdpa (models/attention.py)
from .compute import on_compute
from .lean_forward import LeanForward
from .packed_linear import pack_linear_layers
from .quantize import cpu_has, quantize_model
from .weights import resolve_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# On a CPU with AVX512-BF16 but no AMX, bf16 halves the weight bytes a step streams but runs every
# small op slower: it pays for big models only. Measured on an AMD EPYC (AVX512-BF16, no AMX), 2
# cores, one decode step at context 300: SmolLM2-135M fp32 (oneDNN-packed) 48 ms vs bf16 61 ms;
# Qwen2.5-1.5B fp32 171 ms vs bf16 146 ms (BENCHMARKS.md, section 7).
BF16_MIN_PARAMS = 1_000_000_000


def native_bf16(device: str = "cpu") -> bool:
    """bf16 runs natively: CUDA with bf16, or a CPU oneDNN has bf16 kernels for (AVX512-BF16/AMX)."""
    if device.startswith("cuda"):
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def pick_dtype(dtype: str | torch.dtype, device: str, num_params: int | None = None) -> torch.dtype:
    """"auto" = bf16 where the hardware runs it natively and it pays, fp32 otherwise: CUDA bf16
    (fp16 without bf16); on a CPU, bf16 with AMX, and with AVX512-BF16 alone only for models of
    at least BF16_MIN_PARAMS parameters (`num_params`; None counts as big); emulated bf16 (AVX2)
    is always slower than fp32. Exactness tests ask for float32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        try:
            return DTYPES[dtype]
        except KeyError:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
    if device.startswith("cuda"):
        return torch.bfloat16 if native_bf16(device) else torch.float16
    if not native_bf16(device):
        return torch.float32
    if cpu_has("amx_bf16") or num_params is None or num_params >= BF16_MIN_PARAMS:
        return torch.bfloat16
    return torch.float32


def count_parameters(path: str) -> int:
    """Parameters of the model at `path`, from its config alone (built on the meta device)."""
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def sample_token(probs: torch.Tensor, generator: torch.Generator | None = None) -> int:
    """Draw one token id from a processed law [V] (a one-hot greedy row draws its argmax)."""
    return int(torch.multinomial(probs, 1, generator=generator).item())


class CausalLM:
    """A loaded causal LM + tokenizer. Thread-safety: one forward at a time per model (a lock),
    which is what a CPU replica wants anyway."""

    def __init__(self, model, tokenizer, name: str = "") -> None:
        self.model = model.eval()
        # where its weights live, read once: next(parameters()) walks the module tree (~10 us), and
        # every forward builds its position and mask tensors there
        self._device = next(self.model.parameters()).device
        self.tokenizer = tokenizer
        self.name = name or getattr(model.config, "_name_or_path", "") or type(model).__name__
        self.lock = threading.RLock()
        self.compute_lane = 0  # which compute thread runs its CPU work (models/compute.py lanes)
        self.kernels = str(self.dtype).removeprefix("torch.")  # what its linear layers run (summaries)
        # the decoder's arithmetic without transformers' per-call machinery, where it computes the
        # same (models/lean_forward.py); built lazily, after quantization or packing swapped layers
        self._lean: LeanForward | None | bool = False

    @classmethod
    @on_compute  # the loading thread is the one that runs every later forward (models/compute.py)
    def load(
        cls,
        spec: str,
        dtype: str | torch.dtype = "auto",
        device: str = "cpu",
        attn_implementation: str = ATTENTION,
        pack_weights: bool = True,
        quantize: str | None = None,
        name: str | None = None,
    ) -> "CausalLM":
        """`spec`: an alias from models/weights.py, a local directory or a hub id.
        pack_weights: on fp32 CPU models, prepack every linear layer for oneDNN
        (models/packed_linear.py), so verifying several rows costs about one decode step.
        quantize: "int8" / "int4" weight quantization (models/quantize.py; drafters only)."""
        path = resolve_model(spec)
        # "auto" on a CPU may depend on the model's size (pick_dtype); counting is ~30 ms, on the meta device
        num_params = count_parameters(path) if dtype == "auto" and not device.startswith("cuda") else None
        torch_dtype = pick_dtype(dtype, device, num_params)
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype, attn_implementation=attn_implementation
        ).to(device)
        if quantize:
            kernels = quantize_model(model, quantize)
        elif pack_weights and pack_linear_layers(model):  # a no-op off CPU / fp32
            kernels = "fp32 oneDNN-packed"
        else:
            kernels = str(torch_dtype).removeprefix("torch.")
        lm = cls(model, tokenizer, name=name or spec)
        lm.kernels = kernels
        return lm

    @property
    def vocab_size(self) -> int:
        """Rows of the output layer (may exceed len(tokenizer) when the embedding is padded)."""
        return int(self.model.get_output_embeddings().out_features)

    @property
    def max_positions(self) -> int:
        """Longest text (prompt + generation) the model's position embeddings cover."""
        return int(getattr(self.model.config, "max_position_embeddings", 0) or 0)

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def new_session(self) -> "LMSession":
        return LMSession(self)

    @property
    def lean(self) -> LeanForward | None:
        """The lean forward of this model, or None where it keeps transformers' forward."""
        if self._lean is False:
            self._lean = LeanForward.build(self.model)
        return self._lean

    def use_lean_forward(self, enabled: bool) -> None:
        """Turn the lean forward on (where supported) or off (transformers' forward everywhere;
        for comparisons)."""
        self._lean = False if enabled else None

    def forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor | None,
        cache: DynamicCache,
        logits_to_keep: int = 0,
        want_hidden: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """ONE forward over ids [B, T] at `positions` on top of `cache` (updated in place); mask:
        additive [B, 1, T, past + T] or None (causal). Returns logits [B, T or logits_to_keep, V]
        and, when asked, the last layer's (normed) hidden states [B, T, H]."""
        with self.lock:
            lean = self.lean
            if lean is not None:
                return lean(ids, positions, mask, cache, logits_to_keep, want_hidden)
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                cache=cache,
                use_cache=True,
                logits_to_keep=logits_to_keep,
                output_hidden_states=want_hidden,
            )
        return out.logits, (out.hidden_states[-1] if want_hidden else None)

    @on_compute  # timed on the same thread as the engine's model work
    @torch.inference_mode()
    def plain_generate(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        sampling: SamplingParams = SamplingParams(),
        seed: int | None = None,
        stop_ids: tuple[int, ...] | list[int] = (),
        on_token=None,
    ) -> list[int]:
        """The plain decoding baseline: one token per forward, through the same process_logits.
        Returns the new tokens (a stop token is included and ends generation). `on_token(token)`, when
        given, is called as each token is drawn (e.g. to time the first one)."""
        session = self.new_session()
        session.sync(list(prompt_ids))
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        out: list[int] = []
        stops = set(stop_ids)
        for _ in range(max_new_tokens):
            logits = session.next_logits()
            # greedy: the argmax itself (multinomial over a one-hot row costs ~2 ms at V = 49k)
            token = greedy_token(logits) if sampling.greedy else sample_token(process_logits(logits, sampling), generator)
            out.append(token)
            if on_token is not None:
                on_token(token)
            if token in stops:
                break
            session.append(token)
        return out


@dataclass
class _Scored:
    """What the last score_tree left in the cache (so commit can keep those rows)."""

    tree: TokenTree
    prefix_len: int  # cache rows before the pending token
    tree_tokens: tuple[int, ...]


class LMSession:
    """One request's state on one model: the committed tokens and a KV cache (see module doc)."""

    def __init__(self, lm: CausalLM) -> None:
        self.lm = lm
        self.committed: list[int] = []
        self.cache = DynamicCache(config=lm.model.config)
        unsupported = {type(layer).__name__ for layer in self.cache.layers} - {DynamicLayer.__name__}
        if unsupported:
            # a custom 4-D tree mask bypasses transformers' sliding-window masking, and those
            # layers drop old rows, so tree scoring would be silently wrong: refuse instead
            raise NotImplementedError(
                f"{lm.name}: cache layers {sorted(unsupported)} (sliding-window or hybrid attention) "
                "are not supported for tree verification; only full-attention models are"
            )
        self._cached: list[int] = []  # token ids whose KV rows are in the cache, in order
        self._logits_after_cached: torch.Tensor | None = None  # fp32 [V], valid iff set
        self._hidden_after_cached: torch.Tensor | None = None
        self._scored: _Scored | None = None  # tree rows currently appended to the cache
        self.forwards = 0  # forward passes run (for tests and accounting)

    # ---- the committed text ------------------------------------------------------------
    def sync(self, committed_ids: list[int]) -> None:
        """Make `committed_ids` the committed text. Keeps the longest common prefix of the cache
        (a rollback or a different text only crops); the rest is prefilled lazily."""
        if not committed_ids:
            raise ValueError("a session needs at least one committed token")
        self._drop_scored()
        common = 0
        for a, b in zip(self._cached, committed_ids):
            if a != b:
                break
            common += 1
        self._crop_to(common)
        self.committed = list(committed_ids)

    def append(self, token: int) -> None:
        """Commit one more token (a plain decode step; the forward runs on the next read)."""
        self._drop_scored()
        self.committed.append(int(token))

    @torch.inference_mode()
    def next_logits(self) -> torch.Tensor:
        """fp32 logits [V] of the next token after the committed text."""
        self._forward_to(len(self.committed))
        assert self._logits_after_cached is not None
        return self._logits_after_cached

    @torch.inference_mode()
    def next_hidden(self) -> torch.Tensor:
        """Last-layer hidden state [H] at the last committed token (MCSD decision model input)."""
        self._forward_to(len(self.committed))
        assert self._hidden_after_cached is not None
        return self._hidden_after_cached

    # ---- verification --------------------------------------------------------------------
    @torch.inference_mode()
    def score_tree(self, tree: TokenTree) -> torch.Tensor:
        """ONE forward over [pending] + tree.tokens on top of the cache; fp32 logits [n + 1, V].
        Does not commit anything: the tree rows stay in the cache only until the next call."""
        feed, positions, visible = self.tree_inputs(tree)
        positions_t = torch.tensor([positions], device=self.lm.device)
        logits, _ = self._forward(feed, positions_t, self._additive_mask(visible), all_logits=True)
        self.mark_scored(tree)
        return logits

    @torch.inference_mode()
    def extend_scored(self, tree: TokenTree) -> torch.Tensor:
        """After `score_tree(tree)` (or an earlier extend), `tree` grew: ONE forward over just its
        new nodes, on top of the rows already in the cache; fp32 logits [new nodes, V]. How a
        drafter decodes several branches at once without re-scoring the tree every step."""
        scored = self._scored
        if scored is None or scored.tree is not tree or tuple(tree.tokens[: len(scored.tree_tokens)]) != scored.tree_tokens:
            raise ValueError("extend_scored needs the tree last scored on this session (only grown since)")
        old, prefix = len(scored.tree_tokens), scored.prefix_len
        new = range(old, len(tree))
        visible = torch.zeros(len(new), prefix + 1 + len(tree), dtype=torch.bool)
        visible[:, : prefix + 1] = True  # cached prefix + pending token
        for row, node in enumerate(new):
            j = node
            while j != ROOT:  # the node itself and its ancestors
                visible[row, prefix + 1 + j] = True
                j = tree.parents[j]
        positions = torch.tensor([[prefix + tree.depths[i] for i in new]], device=self.lm.device)
        logits, _ = self._forward([tree.tokens[i] for i in new], positions, self._additive_mask(visible), all_logits=True)
        self._scored = _Scored(tree, prefix, tuple(tree.tokens))
        return logits

    def tree_inputs(self, tree: TokenTree) -> tuple[list[int], list[int], torch.Tensor]:
        """Bring the cache to `committed[:-1]`, then what a verification pass feeds on top of it:
        token ids [pending] + tree.tokens, their position ids, and bool visibility [n + 1, prefix
        + n + 1] over (cached rows, fed rows). models/batched.py stacks these across sessions."""
        self._forward_to(len(self.committed) - 1)
        prefix = len(self._cached)
        feed = [self.committed[-1], *tree.tokens]
        n = len(tree)
        # positions: the pending token sits at `prefix`, a node at prefix + its depth
        positions = [prefix] + [prefix + d for d in tree.depths]
        visible = torch.zeros(n + 1, prefix + n + 1, dtype=torch.bool)
        visible[:, : prefix + 1] = True  # cached prefix + pending token: seen by every row
        if n:
            visible[1:, prefix + 1 :] = tree.ancestor_mask()  # ancestors + self
        return feed, positions, visible

    def mark_scored(self, tree: TokenTree) -> None:
        """Record that the cache now holds `committed[:-1]` + the rows of [pending] + tree.tokens
        (so `commit` keeps the accepted path's rows instead of recomputing them)."""
        self._scored = _Scored(tree, len(self._cached), tuple(tree.tokens))

    @torch.inference_mode()  # the cache tensors are inference tensors (in-place row moves)
    def commit(self, path: list[int], tree: TokenTree, next_token: int) -> None:
        """Accept `path` (node ids, root to leaf) of `tree`; `next_token` becomes pending."""
        path_tokens = [tree.tokens[i] for i in path]
        scored = self._scored
        if scored is not None and scored.tree is tree and scored.tree_tokens == tuple(tree.tokens):
            # keep prefix + pending + the accepted nodes' rows; drop the other branches
            self._keep_tree_rows(scored.prefix_len + 1, [scored.prefix_len + 1 + i for i in path])
            self._cached = self.committed + path_tokens
            self._scored = None
            self._logits_after_cached = None
            self._hidden_after_cached = None
        else:  # the tree was not scored here: recompute lazily
            self._drop_scored()
        self.committed = self.committed + path_tokens + [int(next_token)]

    # ---- cache bookkeeping ---------------------------------------------------------------
    def _drop_scored(self) -> None:
        if self._scored is not None:
            self._crop_rows(len(self._cached))
            self._scored = None

    def _crop_to(self, length: int) -> None:
        """Keep only the first `length` cached tokens."""
        if length < len(self._cached):
            self._crop_rows(length)
            self._cached = self._cached[:length]
            self._logits_after_cached = None
            self._hidden_after_cached = None

    def _crop_rows(self, length: int) -> None:
        excess = self.cache.get_seq_length() - length
        if excess > 0:
            self.cache.crop(-excess)  # transformers 5.x: a negative count removes that many rows

    def _keep_tree_rows(self, start: int, rows: list[int]) -> None:
        """Keep cache rows [0, start) and then `rows` (ascending, all >= start), dropping the rest.
        Only the accepted tail moves: copying the whole cache (index_select) cost ~10 % of a SmolLM2
        step at a 1000-token context. A chain accepted from its first node needs no copy at all."""
        if rows and rows != list(range(start, start + len(rows))):
            index = torch.tensor(rows, device=self.lm.device)
            for layer in self.cache.layers:
                if getattr(layer, "keys", None) is not None and layer.keys.numel():
                    layer.keys[..., start : start + len(rows), :] = layer.keys.index_select(-2, index)
                    layer.values[..., start : start + len(rows), :] = layer.values.index_select(-2, index)
        self._crop_rows(start + len(rows))

    def _forward_to(self, length: int) -> None:
        """Bring the cache to hold committed[:length], prefilling what is missing. Invariant: the
        cached tokens are always a prefix of the committed ones (sync/append/commit keep it)."""
        self._drop_scored()
        wants_logits = length == len(self.committed)
        if wants_logits and len(self._cached) == length and self._logits_after_cached is None:
            self._crop_to(length - 1)  # the last row's logits are gone (after commit): redo it
        self._crop_to(length)
        if len(self._cached) == length:
            return
        start = len(self._cached)
        positions = torch.arange(start, length, device=self.lm.device).unsqueeze(0)
        logits, hidden = self._forward(self.committed[start:length], positions, None, False)
        self._cached = self.committed[:length]
        self._logits_after_cached = logits[-1]
        self._hidden_after_cached = hidden

    def _additive_mask(self, visible: torch.Tensor) -> torch.Tensor:
        """bool [q, kv] -> additive float mask [1, 1, q, kv] (works for eager and sdpa)."""
        dtype = self.lm.dtype
        mask = torch.zeros(visible.shape, dtype=dtype)
        mask.masked_fill_(~visible, torch.finfo(dtype).min)
        return mask[None, None].to(self.lm.device)

    def _forward(
        self,
        tokens: list[int],
        positions: torch.Tensor,
        mask4d: torch.Tensor | None,
        all_logits: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.tensor([tokens], device=self.lm.device)
        logits, hidden = self.lm.forward(
            ids, positions, mask4d, self.cache, logits_to_keep=0 if all_logits else 1, want_hidden=not all_logits
        )
        self.forwards += 1
        # acceptance runs on the CPU next to the CPU generators (a few rows of logits per pass);
        # on a CPU model .cpu() is a no-op
        last_hidden = hidden[0, -1].float().cpu() if hidden is not None else None
        return logits[0].float().cpu(), last_hidden


class SessionCache:
    """Bounded LRU of sessions keyed by session id (a server keeps one per request)."""

    def __init__(self, lm: CausalLM, max_sessions: int = 64) -> None:
        if max_sessions < 1:
            raise ValueError("max_sessions must be >= 1")
        self.lm = lm
        self.max_sessions = max_sessions
        self._sessions: OrderedDict[str, LMSession] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, session_id: str) -> LMSession:
        """The session for `session_id` (a new one on a miss), marked most recently used."""
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                session = self.lm.new_session()
                self._sessions[session_id] = session
                while len(self._sessions) > self.max_sessions:
                    self._sessions.popitem(last=False)  # evict the least recently used
            else:
                self._sessions.move_to_end(session_id)
            return session

    def drop(self, session_id: str) -> None:
        with self._lock:
            self._sessions.pop(session_id, None)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._sessions

    def __len__(self) -> int:
        return len(self._sessions)


def truncated_copy(lm: CausalLM, num_layers: int, name: str = "") -> CausalLM:
    """A CausalLM that runs only the first `num_layers` decoder layers of `lm`, then its final norm
    and lm_head. Weights are SHARED (no copy): only the module containers are new."""
    base = lm.model.get_decoder()
    total = len(base.layers)
    if not 1 <= num_layers <= total:
        raise ValueError(f"num_layers must be in [1, {total}], got {num_layers}")
    config = copy.deepcopy(lm.model.config)
    config.num_hidden_layers = num_layers
    if getattr(config, "layer_types", None):
        config.layer_types = list(config.layer_types[:num_layers])
    decoder = copy.copy(base)
    decoder._modules = dict(base._modules)  # new container dict: the original keeps all layers
    decoder.layers = torch.nn.ModuleList(list(base.layers[:num_layers]))
    decoder.config = config
    outer = copy.copy(lm.model)
    outer._modules = dict(lm.model._modules)
    outer.config = config
    setattr(outer, outer.base_model_prefix, decoder)
    return CausalLM(outer, lm.tokenizer, name=name or f"{lm.name}[:{num_layers}]")
