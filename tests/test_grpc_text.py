"""Incremental detokenization in serve/service.py: partial UTF-8 is held back, stop sequences are cut
(text and ids), whatever the round sizes are."""

import random

import pytest

from specserve.serve.service import _TextStream
from test_grpc_support import byte_tokenizer

TEXT = "héllo wörld, naïve café ✓ done"
IDS = list(TEXT.encode())


def _feed(stream, ids, sizes):
    deltas, kept, i = [], [], 0
    while i < len(ids) and not stream.stopped:
        n = sizes.pop(0) if sizes else 1
        delta, keep = stream.add(ids[i:i + n])
        deltas.append(delta)
        kept += ids[i:i + keep]
        i += n
    deltas.append(stream.finish())
    return deltas, kept


@pytest.mark.parametrize("seed", range(5))
def test_deltas_rebuild_the_text_and_never_show_half_characters(seed):
    rng = random.Random(seed)
    sizes = [rng.randint(1, 5) for _ in range(len(IDS))]
    deltas, kept = _feed(_TextStream(byte_tokenizer(), []), IDS, sizes)
    assert "".join(deltas) == TEXT and kept == IDS
    assert not any("\ufffd" in d for d in deltas)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("stop", ["wö", "café ✓", "o"])
def test_stop_sequences_cut_text_and_ids(seed, stop):
    rng = random.Random(seed)
    sizes = [rng.randint(1, 6) for _ in range(len(IDS))]
    stream = _TextStream(byte_tokenizer(), ["never", stop])
    deltas, kept = _feed(stream, IDS, sizes)
    cut = TEXT.find(stop)
    assert stream.stopped and "".join(deltas) == TEXT[:cut]
    assert kept == list(TEXT[: cut + len(stop)].encode())  # ids up to the byte completing the stop
