"""Decision-model data collected from engine runs: one (hidden, min(1, t/d)) pair per drafted token."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from specserve.engine import GenerationRequest, SpeculativeEngine
from specserve.engine.decision_data import DecisionDataCollector, RecordingDrafter
from specserve.engine.local import LocalDrafter, LocalVerifier
from specserve.models.causal_lm import CausalLM
from specserve.models.drafters import LMDrafter
from specserve.sampling.mcsd import train_decision_model
from specserve.sampling.params import SamplingParams


def tiny(seed: int) -> CausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=80, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return CausalLM(LlamaForCausalLM(cfg).eval().float(), tokenizer=None, name=f"tiny{seed}")


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_collector_labels_every_drafted_token(temperature):
    verifier, draft_lm = tiny(0), tiny(1)
    recorder = RecordingDrafter(LMDrafter(draft_lm, name="d"))
    collector = DecisionDataCollector(recorder)
    engine = SpeculativeEngine(
        LocalVerifier(verifier, on_verified=collector), [LocalDrafter(recorder)], dynamic_length=False
    )
    sampling = SamplingParams(temperature=temperature)
    _, stats = engine.run(
        GenerationRequest(
            prompt_ids=[1, 2, 3, 4], max_new_tokens=20, draft_length=3, seed=3, sampling=sampling,
            rule="greedy" if sampling.greedy else "sps",
        )
    )
    assert len(collector.hidden) == stats.drafted  # one chain: every node is labelled
    targets = torch.stack(collector.targets)
    assert ((targets >= 0) & (targets <= 1)).all()
    if sampling.greedy:  # one-hot laws: label 1 iff the draft is the verifier's argmax
        assert set(targets.tolist()) <= {0.0, 1.0}
        assert targets.sum() >= stats.accepted
    model = train_decision_model(torch.stack(collector.hidden), targets, epochs=2)
    scores = model(torch.stack(collector.hidden))
    assert scores.shape == targets.shape and ((scores > 0) & (scores < 1)).all()


@pytest.mark.slow
def test_train_decision_model_command(tmp_path):
    out = tmp_path / "decision.pt"
    proc = subprocess.run(
        [sys.executable, "-m", "specserve.cli", "train-decision-model", "--drafter", "early-exit:6",
         "--num-prompts", "1", "--max-new-tokens", "8", "--epochs", "2", "--dtype", "float32", "--out", str(out)],
        capture_output=True, text=True, timeout=600, env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    assert proc.returncode == 0, proc.stderr
    assert out.exists() and "decision model saved" in proc.stderr
