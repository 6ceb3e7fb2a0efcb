"""Training data for the MCSD early-stop decision model, collected from real engine runs.

For every token an LM drafter proposed, the verifier's pass gives t(x) and the drafter gave
d(x) and its last hidden state; the "soft" label is min(1, t(x) / d(x)) (sampling/mcsd.py).
The decision model is used by rule mcsd-ti, which is LOSSY (sampling/mcsd.py)."""

from __future__ import annotations

import json
from argparse import Namespace
from pathlib import Path

import torch

from ..models.base import DraftProposal
from ..models.drafters import LMDrafter
from ..sampling.mcsd import acceptance_targets, train_decision_model
from ..sampling.params import SamplingParams
from ..tree.token_tree import ROOT

DEFAULT_PROMPTS = (
    "Summarize in two sentences why the sky looks blue.",
    "Rewrite in plain words: The committee has resolved to postpone the deliberations.",
    "Write a short poem about a lighthouse keeper.",
    "Explain what a hash table is to a beginner.",
    "List three tips for writing clear emails.",
    "Translate into German: The weather is nice today and we are going for a walk.",
)


class RecordingDrafter:
    """An LMDrafter with hidden states on; remembers its last proposal for the observer."""

    def __init__(self, drafter: LMDrafter) -> None:
        drafter.with_hidden = True
        self.drafter = drafter
        self.name = drafter.name
        self.last: DraftProposal | None = None

    def propose(self, context, num_tokens, params, generator=None, session_id: str = "") -> DraftProposal:
        self.last = self.drafter.propose(context, num_tokens, params, generator, session_id=session_id)
        return self.last


class DecisionDataCollector:
    """Verifier observer: pairs each drafted chain node with (hidden, min(1, t/d))."""

    def __init__(self, recorder: RecordingDrafter) -> None:
        self.recorder = recorder
        self.hidden: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []

    def __call__(self, call, target_probs: torch.Tensor, verdict) -> None:
        proposal = self.recorder.last
        tree = call.tree
        if proposal is None or proposal.hidden is None or not len(tree):
            return
        node, parent_row = ROOT, 0
        for i, token in enumerate(proposal.tokens[: len(tree)]):
            children = [p for p in tree.proposals.get(node, []) if tree.tokens[p.child] == token]
            if not children:
                break
            t_x = target_probs[parent_row, token]
            # greedy drafts carry no rows: their law is one-hot at the drafted token
            d_x = proposal.probs[i, token] if proposal.probs is not None else torch.tensor(1.0)
            self.hidden.append(proposal.hidden[i].float())
            self.targets.append(acceptance_targets(t_x.reshape(1), d_x.reshape(1))[0])
            node = children[0].child
            parent_row = node + 1


def load_prompts(path: str | None, count: int) -> list[str]:
    if path is None:
        return list(DEFAULT_PROMPTS[:count])
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [r["turns"][0] for r in rows[:count]]


def collect_and_train(args: Namespace) -> tuple[str, int, float]:
    """The `specserve train-decision-model` job; returns (path, examples, final BCE)."""
    from ..cli import encode_prompt, stop_ids
    from ..models.causal_lm import CausalLM
    from .factory import make_drafter
    from .local import LocalDrafter, LocalVerifier
    from .speculative import SpeculativeEngine
    from .types import GenerationRequest

    lm = CausalLM.load(args.verifier, dtype=args.dtype)
    drafter = make_drafter(args.drafter, lm)
    if not isinstance(drafter, LMDrafter):
        raise SystemExit(f"specserve train-decision-model: error: argument --drafter: {args.drafter!r} is not an LM drafter")
    recorder = RecordingDrafter(drafter)
    collector = DecisionDataCollector(recorder)
    engine = SpeculativeEngine(
        LocalVerifier(lm, on_verified=collector), [LocalDrafter(recorder)], dynamic_length=False
    )
    sampling = SamplingParams(temperature=args.temperature)
    for i, prompt in enumerate(load_prompts(args.prompts, args.num_prompts)):
        engine.run(
            GenerationRequest(
                prompt_ids=encode_prompt(lm.tokenizer, prompt, chat=True),
                max_new_tokens=args.max_new_tokens,
                sampling=sampling,
                rule="greedy" if sampling.greedy else "sps",
                draft_length=args.draft_length,
                seed=args.seed + i,
                stop_token_ids=stop_ids(lm),
            )
        )
    if not collector.hidden:
        raise SystemExit("specserve train-decision-model: error: no drafted tokens were collected")
    hidden, targets = torch.stack(collector.hidden), torch.stack(collector.targets)
    model = train_decision_model(hidden, targets, epochs=args.epochs, seed=args.seed)
    with torch.no_grad():
        loss = float(torch.nn.functional.binary_cross_entropy(model(hidden), targets))
    model.save(args.out)
    return str(args.out), int(hidden.shape[0]), loss
