"""specserve: distributed speculative decoding (cascaded drafters + one verifier)."""

__version__ = "0.1.0"
