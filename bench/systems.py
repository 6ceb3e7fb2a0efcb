"""Load the models once and run any Method on one prompt, returning a RunRecord.

Every system gets the same prompt ids, max_new_tokens, stop ids, temperature (top-p 1, top-k off)
and seed, and is timed the same way: wall clock around the whole generation, prefill included,
after a warm-up. Drafter "lm" is the small model of the pair (`--drafter`), or on a single model
an early-exit copy of the verifier's first layers (weights shared); the peer gets the very same
module as its `assistant_model`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from specserve.cascade.csd import CascadeDrafter, LMReviewer, default_k_matrix
from specserve.engine import GenerationRequest, GenerationStats, RuleParams, SpeculativeEngine
from specserve.engine.local import LocalDrafter, LocalVerifier
from specserve.models.causal_lm import CausalLM, truncated_copy
from specserve.engine.factory import load_drafter_lm
from specserve.models.compute import run_sync
from specserve.models.drafters import LMDrafter
from specserve.models.ngram import MaxGramDrafter, PromptLookupDrafter
from specserve.models.quantize import split_spec
from specserve.models.suffix import SuffixDrafter
from specserve.sampling.params import SamplingParams

from .methods import Method
from .peer import peer_generate
from .stats import RunRecord

log = logging.getLogger(__name__)


@dataclass
class ModelSetup:
    verifier_spec: str = "smollm2-135m"
    drafter_spec: str | None = None  # None: early-exit copy of the verifier
    early_exit_layers: int = 8
    dtype: str = "auto"
    device: str = "cpu"  # "cuda" on a GPU machine (acceptance math stays on the CPU)
    cascade_lenience: float = 2.0
    dynamic_length: bool = True
    bigram_texts: list[str] = field(default_factory=list)  # Max-Gram's bigram fallback corpus


class Systems:
    """The loaded models and the drafters built on them, shared by every method of a run."""

    def __init__(
        self, setup: ModelSetup, verifier: CausalLM | None = None, drafter: CausalLM | None = None
    ) -> None:
        """`verifier` / `drafter`: already loaded models (tests); otherwise loaded from the setup."""
        self.setup = setup
        self.verifier = verifier or CausalLM.load(setup.verifier_spec, dtype=setup.dtype, device=setup.device)
        if drafter is not None:
            self.drafter = drafter
            self.drafter_label = setup.drafter_spec or drafter.name
        elif setup.drafter_spec:
            self.drafter = load_drafter_lm(setup.drafter_spec, self.verifier)  # "MODEL@int8" quantizes
            self.drafter_label = setup.drafter_spec
        else:
            self.drafter = truncated_copy(self.verifier, setup.early_exit_layers)
            self.drafter_label = f"early-exit:{setup.early_exit_layers}"
        # the peer's assistant at full precision (hf-assisted), and the quantized one where ours is
        # quantized (hf-assisted-q: transformers runs our quantized modules as they are)
        base, scheme = split_spec(setup.drafter_spec) if setup.drafter_spec else (None, None)
        self.peer_drafter = self.drafter
        if scheme is not None and drafter is None:
            base = self.verifier.name if base == "self" else base
            self.peer_drafter = CausalLM.load(base, dtype=setup.dtype, device=setup.device)
        self.tokenizer = self.verifier.tokenizer
        self.stop_ids = stop_token_ids(self.verifier)
        self._local_verifier = LocalVerifier(self.verifier, max_sessions=2)
        self._bigram = MaxGramDrafter.from_texts(self.tokenizer, setup.bigram_texts, name="ngram")


    # ---- our drafters ------------------------------------------------------------------
    def _drafter_backend(self, kind: str, draft_length: int):
        if kind == "lm":
            return LocalDrafter(
                LMDrafter(self.drafter, name="lm", max_sessions=2,
                          target_vocab_size=self.verifier.vocab_size)
            )
        if kind == "ngram":
            return LocalDrafter(self._bigram, name="ngram")
        if kind == "prompt-lookup":
            return LocalDrafter(PromptLookupDrafter(name="prompt-lookup"))
        if kind == "suffix":
            # a new one per engine (= per method and temperature): its global trie learns from the
            # earlier prompts of the run, as a server's would, never from another method's answer
            # to the same prompt
            return LocalDrafter(SuffixDrafter(name="suffix"))
        if kind == "cascade":
            cascade = CascadeDrafter(
                [LMReviewer(self.drafter, name="lm")],
                self._bigram,
                default_k_matrix(2, draft_length),
                lenience=self.setup.cascade_lenience,
                name="cascade",
            )
            return LocalDrafter(cascade)
        raise ValueError(f"unknown drafter kind {kind!r}")

    def engine_for(self, method: Method) -> SpeculativeEngine:
        drafters = [self._drafter_backend(k, method.draft_length) for k in method.drafters]
        return SpeculativeEngine(self._local_verifier, drafters, dynamic_length=self.setup.dynamic_length,
                                 min_draft_confidence=method.min_confidence,
                                 greedy_alternatives=method.greedy_alternatives)

    def request_for(
        self, method: Method, prompt_ids: list[int], max_new_tokens: int, temperature: float, seed: int
    ) -> GenerationRequest:
        return GenerationRequest(
            prompt_ids=list(prompt_ids),
            max_new_tokens=max_new_tokens,
            sampling=SamplingParams(temperature=temperature, top_k=0, top_p=1.0),
            rule=method.rule,
            rule_params=RuleParams(delta=method.delta),
            draft_length=method.draft_length,
            tree_config=method.tree_config,
            seed=seed,
            stop_token_ids=tuple(self.stop_ids),
        )

    # ---- one generation ----------------------------------------------------------------
    def run(
        self,
        method: Method,
        prompt_ids: list[int],
        max_new_tokens: int,
        temperature: float,
        seed: int,
        category: str = "",
        question_id: int = -1,
        engine: SpeculativeEngine | None = None,
    ) -> RunRecord:
        sampling = SamplingParams(temperature=temperature, top_k=0, top_p=1.0)
        common = dict(method=method.name, category=category, question_id=question_id,
                      temperature=temperature, prompt_tokens=len(prompt_ids))
        if method.system == "plain":
            first = FirstToken()
            t0 = time.perf_counter()
            tokens = self.verifier.plain_generate(prompt_ids, max_new_tokens, sampling, seed, self.stop_ids,
                                                  on_token=first.seen)
            seconds = time.perf_counter() - t0
            return RunRecord(**common, generated=len(tokens), seconds=seconds, rounds=len(tokens),
                             drafted=0, accepted=0, output_ids=tokens, first_token_seconds=first.since(t0))
        if method.system == "ours":
            engine = engine or self.engine_for(method)
            request = self.request_for(method, prompt_ids, max_new_tokens, temperature, seed)
            with _CountDrops() as drops:
                first = FirstToken()
                stats = GenerationStats()
                tokens = []
                t0 = time.perf_counter()
                for round_result in engine.generate(request, stats):
                    if round_result.tokens:
                        first.seen()
                    tokens.extend(round_result.tokens)
                seconds = time.perf_counter() - t0
            if drops.count:  # a failing drafter silently turns the method into plain decoding
                log.warning("%s: a drafter failed in %d rounds (see warnings above)", method.name, drops.count)
            return RunRecord(
                **common, generated=len(tokens), seconds=seconds, rounds=stats.rounds,
                drafted=stats.drafted, accepted=stats.accepted,
                accepted_per_position=list(stats.accepted_per_position),
                drafted_per_position=list(stats.drafted_per_position),
                accepted_by_drafter=dict(stats.accepted_by_drafter),
                drafted_by_drafter=dict(stats.drafted_by_drafter),
                output_ids=list(tokens),
                drafter_failures=drops.count,
                first_token_seconds=first.since(t0),
            )
        if method.system == "peer":
            assistant = self.drafter if method.peer_method == "hf-assisted-q" else self.peer_drafter
            # on the compute thread, like our engine's model work (models/compute.py)
            result = run_sync(
                peer_generate,
                method.peer_method.removesuffix("-q"), self.verifier.model, prompt_ids, max_new_tokens, temperature,
                seed, assistant=assistant.model, stop_ids=tuple(self.stop_ids),
                early_exit_layers=self.setup.early_exit_layers,
            )
            c = result.counts
            rounds = c.rounds if c is not None else len(result.tokens)
            # transformers' last round can emit fewer tokens than it accepted (length cut): count
            # the tokens actually returned; the rounds are the verifier passes it really ran
            return RunRecord(
                **common, generated=len(result.tokens), seconds=result.seconds, rounds=rounds,
                drafted=c.drafted if c else 0, accepted=c.accepted if c else 0,
                accepted_per_position=c.accepted_per_position if c else [],
                drafted_per_position=c.drafted_per_position if c else [],
                output_ids=result.tokens,
                first_token_seconds=result.first_token_seconds,
            )
        raise ValueError(f"unknown system {method.system!r}")


class FirstToken:
    """Remembers when the first new token appeared (the first call of `seen`)."""

    def __init__(self) -> None:
        self.at: float | None = None

    def seen(self, *_args) -> None:
        if self.at is None:
            self.at = time.perf_counter()

    def since(self, t0: float) -> float | None:
        return None if self.at is None else self.at - t0


class _CountDrops(logging.Handler):
    """Counts the decode loop's "drafter dropped for this round" warnings while active."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "dropped" in record.getMessage():
            self.count += 1

    def __enter__(self) -> "_CountDrops":
        logging.getLogger("specserve.engine.loop").addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger("specserve.engine.loop").removeHandler(self)


def stop_token_ids(lm: CausalLM) -> list[int]:
    """eos of the tokenizer and of the generation config (chat models end turns with their own id)."""
    ids: set[int] = set()
    if lm.tokenizer is not None and lm.tokenizer.eos_token_id is not None:
        ids.add(int(lm.tokenizer.eos_token_id))
    gen_eos = getattr(getattr(lm.model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif gen_eos:
        ids.update(int(i) for i in gen_eos)
    return sorted(ids)


def set_threads(n: int | None) -> int:
    if n:
        torch.set_num_threads(n)
    return torch.get_num_threads()
