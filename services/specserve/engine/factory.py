"""Drafter specs (what the CLI and config files say) -> in-process drafter backends.

    "ngram"          Max-Gram (CS Drafting's statistical bottom; costs ~0)
    "ngram:PATH"     Max-Gram with its bigram fallback table built from a text file (one text per
                     line), tokenized with the verifier's tokenizer
    "prompt-lookup"  prompt lookup decoding (n-gram copy from the context)
    "suffix"         SuffixDecoding: suffix tries over the request and earlier outputs, drafts trees
    "early-exit:N"   the verifier's first N layers (shares its weights)
    anything else    a causal LM (alias, local path or hub id) sharing the verifier's tokenizer
    "MODEL@int8|int4" that LM with quantized weights (models/quantize.py); "self@int8|int4" is a
                     quantized copy of the verifier's own weights (shares nothing but the tokenizer)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..cascade.csd import CascadeDrafter, LMReviewer, default_k_matrix
from ..models.base import Drafter
from ..models.causal_lm import CausalLM, truncated_copy
from ..models.drafters import EarlyExitDrafter, LMDrafter, check_same_tokenizer
from ..models.quantize import drafter_dtype, split_spec
from ..models.ngram import MaxGramDrafter, PromptLookupDrafter
from ..models.suffix import SuffixDrafter
from .local import LocalDrafter

STATISTICAL = ("ngram", "prompt-lookup", "suffix")


def is_statistical(spec: str) -> bool:
    return spec in STATISTICAL or spec.startswith("ngram:")


def make_max_gram(spec: str, verifier: CausalLM) -> MaxGramDrafter:
    """"ngram" -> Max-Gram without a bigram table; "ngram:PATH" -> with one built from PATH."""
    if spec == "ngram":
        return MaxGramDrafter(name="ngram")
    path = Path(spec.split(":", 1)[1])
    if not path.is_file():
        raise ValueError(f"ngram drafter: corpus file {str(path)!r} (from {spec!r}) does not exist")
    if verifier.tokenizer is None:
        raise ValueError("ngram drafter: a bigram corpus needs the verifier's tokenizer")
    texts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return MaxGramDrafter.from_texts(verifier.tokenizer, texts, name="ngram")


def parse_early_exit(spec: str) -> int:
    try:
        layers = int(spec.split(":", 1)[1])
    except ValueError:
        raise ValueError(f"early-exit drafter must be 'early-exit:N' with an integer N, got {spec!r}") from None
    if layers < 1:
        raise ValueError(f"early-exit drafter needs N >= 1 layers, got {spec!r}")
    return layers


def load_drafter_lm(spec: str, verifier: CausalLM) -> CausalLM:
    """The LM behind a neural drafter spec (early-exit shares the verifier's weights)."""
    if spec.startswith("early-exit:"):
        return truncated_copy(verifier, parse_early_exit(spec), name=spec)
    model, scheme = split_spec(spec)
    if model == "self":
        if scheme is None:
            raise ValueError(f"drafter {spec!r}: 'self' needs a quantization, e.g. 'self@int8'")
        model = verifier.name
    dtype = drafter_dtype(verifier.dtype, str(verifier.device), scheme)
    lm = CausalLM.load(model, dtype=dtype, device=str(verifier.device), quantize=scheme, name=spec)
    check_same_tokenizer(lm, verifier)
    return lm


def make_drafter(spec: str, verifier: CausalLM) -> Drafter:
    if spec == "ngram" or spec.startswith("ngram:"):
        return make_max_gram(spec, verifier)
    if spec == "prompt-lookup":
        return PromptLookupDrafter(name=spec)
    if spec == "suffix":
        return SuffixDrafter(name=spec)
    if spec.startswith("early-exit:"):
        return EarlyExitDrafter(verifier, parse_early_exit(spec))
    lm = load_drafter_lm(spec, verifier)
    return LMDrafter(lm, name=spec, target_vocab_size=verifier.vocab_size)


def make_cascade(
    specs: Sequence[str],
    verifier: CausalLM,
    draft_length: int,
    k_matrix: Sequence[Sequence[int]] | None = None,
    lenience: float = 1.0,
) -> CascadeDrafter:
    """CS Drafting over the neural drafters in `specs` (largest first, as given) with Max-Gram at
    the bottom; statistical specs other than the bottom are not cascade levels."""
    neural = [s for s in specs if not is_statistical(s)]
    corpus = [s for s in specs if s.startswith("ngram:")]
    reviewers = [LMReviewer(load_drafter_lm(s, verifier), name=s) for s in neural]
    k = k_matrix or default_k_matrix(len(reviewers) + 1, draft_length)
    name = "cascade(" + ">".join([*neural, "ngram"]) + ")"
    bottom = make_max_gram(corpus[0] if corpus else "ngram", verifier)
    return CascadeDrafter(reviewers, bottom, k, lenience=lenience, name=name)


def make_local_drafters(specs: Sequence[str], verifier: CausalLM) -> list[LocalDrafter]:
    # "ngram:PATH" reports as "ngram" (stats and metrics labels stay short)
    return [LocalDrafter(make_drafter(spec, verifier), name=spec.split(":", 1)[0] if spec.startswith("ngram:") else spec)
            for spec in specs]
