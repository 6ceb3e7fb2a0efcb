"""The in-process decode loop and its backends (see loop.py for the round structure)."""

from .loop import DecodeLoop, round_seed
from .speculative import SpeculativeEngine
from .types import LOSSY_RULES, RULES, GenerationRequest, GenerationStats, RoundResult, RuleParams

__all__ = [
    "LOSSY_RULES",
    "RULES",
    "DecodeLoop",
    "GenerationRequest",
    "GenerationStats",
    "RoundResult",
    "RuleParams",
    "SpeculativeEngine",
    "round_seed",
]
