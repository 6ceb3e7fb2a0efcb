"""The `specserve` command line: argument errors name the argument (exit 2); a real run streams
text and ends with one summary line."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from specserve.cli import build_parser, main, summary_line
from specserve.engine.types import GenerationStats


@pytest.mark.parametrize(
    "argv, named",
    [
        (["generate", "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["generate", "hi", "--top-p", "1.5"], "--top-p"),
        (["generate", "hi", "--top-k", "-1"], "--top-k"),
        (["generate", "hi", "--temperature", "-0.5"], "--temperature"),
        (["generate", "hi", "--tree", "4,x,2"], "--tree"),
        (["generate", "hi", "--tree", "4,0"], "--tree"),
        (["generate", "hi", "--rule", "nope"], "--rule"),
        (["generate", "hi", "--drafter", "early-exit:x"], "--drafter"),
        (["generate", "hi", "--drafter", "early-exit:0"], "--drafter"),
        (["generate", "hi", "--drafter", "ngram:/no/such/corpus.txt"], "--drafter"),
        (["generate", "hi", "--decision-model", "/no/such/model.pt"], "--decision-model"),
        (["generate", "hi", "--cascade-k", "4,2;a"], "--cascade-k"),
        (["generate", "hi", "--dtype", "int3"], "--dtype"),
        (["generate", "hi", "--cascade", "--lenience", "0.5"], "--lenience"),
        (["generate", "hi", "--rule", "greedy", "--temperature", "0.7"], "--rule"),
        (["generate", "hi", "--rule", "spechub"], "--rule"),
        (["generate", "hi", "--rule", "spechub", "--temperature", "1", "--tree", "3,1"], "--tree"),
        (["generate", "hi", "--plain", "--drafter", "ngram"], "--plain"),
        (["generate", "hi", "--rule", "mcsd-ti", "--tree", "2,2"], "--tree"),
        (["generate"], "prompt"),
        (["frobnicate"], "COMMAND"),
    ],
)
def test_bad_arguments_exit_2_naming_the_argument(argv, named, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert named in err, err


def test_bad_argument_through_the_console_entry_point():
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, "-m", "specserve.cli", "generate", "hi", "--max-new-tokens", "-3"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "--max-new-tokens" in proc.stderr and "must be >= 1" in proc.stderr


def test_defaults_are_the_offline_embedded_setup():
    args = build_parser().parse_args(["generate", "hi"])
    assert args.verifier == "smollm2-135m"
    assert args.drafter is None  # -> ngram + suffix + prompt-lookup
    assert args.temperature == 0.0 and args.rule is None  # greedy
    assert args.tree is None and not args.plain
    assert build_parser().parse_args(["generate", "hi", "--tree", "4,2,2"]).tree == (4, 2, 2)


def test_lossy_rules_are_labelled_in_help_and_summary():
    help_text = build_parser()._subparsers._group_actions[0].choices["generate"].format_help()
    for rule in ("cactus", "tas", "mcsd-ti"):
        assert re.search(rf"{rule} \(LOSSY", help_text.replace("\n", " ").replace("  ", " "))
    stats = GenerationStats(rounds=2, generated=5, accepted=3)
    assert "(LOSSY)" in summary_line(stats, 1.0, "cactus")
    assert "(LOSSY)" not in summary_line(stats, 1.0, "sps")


@pytest.mark.slow
def test_generate_on_the_embedded_default_streams_and_summarises():
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(
        [
            sys.executable, "-m", "specserve.cli", "generate",
            "Rewrite in plain words: The committee resolved to postpone the deliberations.",
            "--max-new-tokens", "12",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    summary = [line for line in proc.stderr.splitlines() if line.startswith("[")]
    assert len(summary) == 1
    assert re.search(
        r"tok/s; [\d.]+ tokens per verifier step; mean accepted length [\d.]+; acceptance per drafter: .*ngram",
        summary[0],
    ), summary[0]


@pytest.mark.slow
def test_decision_model_is_attached_to_lm_drafters_and_checked(tmp_path, capsys):
    from specserve.sampling.mcsd import DecisionModel

    wrong = tmp_path / "wrong.pt"
    DecisionModel(hidden_size=7).save(wrong)
    argv = ["generate", "hi", "--max-new-tokens", "4", "--drafter", "early-exit:4", "--decision-model", str(wrong)]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "--decision-model: trained on hidden size 7" in capsys.readouterr().err
    right = tmp_path / "right.pt"
    DecisionModel(hidden_size=576).save(right)  # SmolLM2-135M's hidden size
    assert main([*argv[:-1], str(right)]) == 0
