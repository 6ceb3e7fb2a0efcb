"""The `specserve` command line.

    specserve generate "prompt" [--verifier M] [--drafter D ...] [--cascade] [--rule R] ...
    specserve generate "prompt" --plain          # the plain decoding baseline, same model
    specserve train-decision-model --out FILE    # MCSD early-stop MLP from engine runs
    specserve serve ... / generate --server ...  # added by serve/cli_commands.py when present

`generate` loads the models in this process, applies the chat template, streams the text to
stdout as rounds are accepted and ends with ONE summary line on stderr. The default is the
embedded SmolLM2-135M-Instruct with the n-gram (Max-Gram) and prompt-lookup drafters, greedy:
it needs no network.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .engine.types import DEFAULT_MIN_DRAFT_CONFIDENCE, LOSSY_RULES, RULES

DEFAULT_VERIFIER = "smollm2-135m"
DEFAULT_DRAFTERS = ("ngram", "suffix", "prompt-lookup")  # the model-free trio (BENCHMARKS.md section 1)

RULE_HELP = (
    "acceptance rule: greedy (exact match), sps (lossless speculative sampling), rrs / rrs-wor / "
    "spechub (lossless multi-draft), cactus (LOSSY: bounded per-step divergence --delta), tas "
    "(LOSSY typical acceptance), mcsd-ti (LOSSY improved MCSD: target-initialised roots + "
    "longest-branch selection). Default: greedy at temperature 0, sps otherwise."
)


# ---- argument types: errors name the argument (argparse exits with status 2) ----------------
def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def probability(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def confidence(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def tree_config(text: str) -> tuple[int, ...]:
    """"4,2,2" -> (4, 2, 2): children per level of an MCSD k-config tree."""
    try:
        levels = tuple(int(k) for k in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers like 4,2,2, got {text!r}") from None
    if not levels or any(k < 1 for k in levels):
        raise argparse.ArgumentTypeError(f"every level needs >= 1 child, got {text!r}")
    return levels


def k_matrix(text: str) -> list[list[int]]:
    """"4,2;0,6" -> [[4, 2], [0, 6]] (rows separated by ';', increment convention)."""
    try:
        return [[int(v) for v in row.split(",")] for row in text.split(";")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must look like '4,2;0,6', got {text!r}") from None


def existing_file(text: str) -> str:
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"{text!r} is not a file")
    return text


def drafter_spec(text: str) -> str:
    if text.startswith("early-exit:"):
        from .engine.factory import parse_early_exit

        try:
            parse_early_exit(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    if text.startswith("ngram:") and not Path(text.split(":", 1)[1]).is_file():
        raise argparse.ArgumentTypeError(f"ngram bigram corpus {text.split(':', 1)[1]!r} is not a file")
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


# ---- parser ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="specserve", description="Distributed speculative decoding (cascaded drafters + one verifier)."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser(
        "generate",
        help="generate text with speculative decoding in this process",
        description="Generate with speculative decoding: drafters propose, the verifier checks the "
        "merged candidates in one forward per round. Lossless rules reproduce the verifier's output "
        "law exactly (greedy: token for token); " + ", ".join(sorted(LOSSY_RULES)) + " are LOSSY.",
    )
    g.add_argument("prompt", help="the user message (the chat template is applied unless --no-chat)")
    g.add_argument("--verifier", default=DEFAULT_VERIFIER, help=f"verifier model: alias, local path or hub id (default {DEFAULT_VERIFIER})")
    g.add_argument(
        "--drafter", action="append", type=drafter_spec, default=None,
        help='drafter, repeatable: "ngram" (Max-Gram), "ngram:FILE" (Max-Gram + a bigram table from FILE, one text per line), "prompt-lookup", "early-exit:N" (the verifier\'s '
        "first N layers) or a model sharing the verifier's tokenizer (default: ngram + prompt-lookup)",
    )
    g.add_argument("--cascade", action="store_true", help="CS Drafting: the neural --drafter models (largest first) review each other's drafts down to Max-Gram, as ONE drafter")
    g.add_argument("--cascade-k", type=k_matrix, default=None, help="CS Drafting K matrix, increment convention, rows ';'-separated (default: first drafter fills --draft-length, lower levels 4)")
    g.add_argument("--lenience", type=float, default=1.0, help="CS Drafting lenience l >= 1 for intermediate reviews (the verifier's review stays exact)")
    g.add_argument("--rule", choices=RULES, default=None, help=RULE_HELP)
    g.add_argument("--delta", type=non_negative_float, default=None, help="cactus divergence budget per step (0 = sps)")
    g.add_argument("--tas-epsilon", type=non_negative_float, default=None, help="tas posterior threshold epsilon")
    g.add_argument("--tas-alpha", type=non_negative_float, default=None, help="tas posterior alpha")
    g.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=non_negative_int, default=0, help="0 = off")
    g.add_argument("--top-p", type=probability, default=1.0, help="1 = off")
    g.add_argument("--max-new-tokens", type=positive_int, default=128)
    g.add_argument("--draft-length", type=non_negative_int, default=16, help="maximum draft depth per round (the dynamic length drafts as deep as pays, often less)")
    g.add_argument("--fixed-length", action="store_true", help="always draft --draft-length (no dynamic draft length)")
    g.add_argument("--ahead", choices=["none", "full-acceptance", "enumerate-select"], default=None,
                   help="draft the next round while the verifier checks this one (engine/ahead.py): bet on full "
                        "acceptance, or draft for every likely outcome with the LM drafter (pays when drafters have "
                        "their own device; on a shared CPU they compete for the cores)")
    g.add_argument("--overlap", action="store_true", help="the same as --ahead full-acceptance")
    g.add_argument("--tree", type=tree_config, default=None, metavar="K1,K2,...", help="MCSD k-config tree from each LM drafter, e.g. 4,2,2 (lossless with sps/rrs/rrs-wor/spechub); "
                   "with --rule mcsd-ti (LOSSY) one number: the root width W (default 2)")
    g.add_argument("--decision-model", type=existing_file, default=None, metavar="FILE",
                   help="MCSD early-stop MLP (from train-decision-model): LM drafters stop a chain when it "
                        "predicts the next token would be rejected (changes draft lengths only)")
    g.add_argument("--min-draft-confidence", type=confidence, default=DEFAULT_MIN_DRAFT_CONFIDENCE, metavar="P",
                   help="LM drafters end a chain after a token they gave probability < P (lengths only: "
                        f"lossless; 0 = off; default {DEFAULT_MIN_DRAFT_CONFIDENCE:g})")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto", help="auto = bf16 where the CPU/GPU runs it natively, else fp32")
    g.add_argument("--device", default="cpu", help='torch device of the models, e.g. "cuda" (acceptance math stays on the CPU)')
    g.add_argument("--plain", action="store_true", help="plain decoding (one verifier forward per token): the baseline")
    g.add_argument("--no-chat", action="store_true", help="tokenize the prompt as is (no chat template)")
    g.set_defaults(func=run_generate)

    t = sub.add_parser(
        "train-decision-model",
        help="train the MCSD early-stop decision model (for rule mcsd-ti, which is LOSSY)",
        description="Run the engine on a few prompts with an LM drafter, record (drafter hidden state, "
        "min(1, t/d)) for every drafted token at verification, train the MLP and save it.",
    )
    t.add_argument("--verifier", default=DEFAULT_VERIFIER)
    t.add_argument("--drafter", type=drafter_spec, default="early-exit:20", help="an LM drafter spec (its hidden states are the features)")
    t.add_argument("--prompts", default=None, help="a JSONL file with Spec-Bench style 'turns' (default: a few built-in prompts)")
    t.add_argument("--num-prompts", type=positive_int, default=4)
    t.add_argument("--max-new-tokens", type=positive_int, default=48)
    t.add_argument("--draft-length", type=positive_int, default=4)
    t.add_argument("--temperature", type=non_negative_float, default=1.0)
    t.add_argument("--epochs", type=positive_int, default=10)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    t.add_argument("--out", required=True, help="where to save the trained model")
    t.set_defaults(func=run_train_decision_model)

    add_serve_commands(sub)
    parser.choices_generate = g  # for errors that name generate's arguments
    return parser


def add_serve_commands(subparsers: argparse._SubParsersAction) -> None:
    """The serving engineer's hook: `serve` and `generate --server` live in serve/cli_commands.py."""
    try:
        module = importlib.import_module("specserve.serve.cli_commands")
    except ModuleNotFoundError as exc:
        if exc.name not in ("specserve.serve.cli_commands", "specserve.serve"):
            raise
        return
    module.add_commands(subparsers)


# ---- generate -------------------------------------------------------------------------------
def encode_prompt(tokenizer, prompt: str, chat: bool) -> list[int]:
    if not chat or getattr(tokenizer, "chat_template", None) is None:
        return list(tokenizer.encode(prompt))
    encoded = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
    )
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def stop_ids(lm) -> tuple[int, ...]:
    ids = getattr(lm.model.generation_config, "eos_token_id", None)
    if ids is None:
        ids = lm.tokenizer.eos_token_id
    if ids is None:
        return ()
    return tuple(ids) if isinstance(ids, (list, tuple)) else (int(ids),)


class TextStream:
    """Print decoded text as tokens arrive (decoding the whole text keeps multi-byte characters whole)."""

    def __init__(self, tokenizer, out) -> None:
        self.tokenizer, self.out, self.ids, self.printed = tokenizer, out, [], ""

    def add(self, tokens: Sequence[int]) -> None:
        self.ids.extend(tokens)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return  # an incomplete character: wait for the next token
        self.out.write(text[len(self.printed) :])
        self.out.flush()
        self.printed = text

    def close(self) -> None:
        self.out.write("\n")
        self.out.flush()


def summary_line(stats, seconds: float, rule: str, plain: bool = False) -> str:
    if plain:
        return (
            f"[plain decoding: {stats.generated} tokens in {seconds:.2f} s, "
            f"{stats.generated / seconds if seconds else 0:.1f} tok/s; 1.00 tokens per verifier step]"
        )
    per_drafter = ", ".join(
        f"{name} {stats.acceptance_rate(name):.0%} of {stats.drafted_by_drafter[name]}"
        for name in sorted(stats.drafted_by_drafter)
    ) or "no drafts"
    lossy = " (LOSSY)" if rule in LOSSY_RULES else ""
    return (
        f"[{stats.generated} tokens in {seconds:.2f} s, {stats.generated / seconds if seconds else 0:.1f} tok/s; "
        f"{stats.tokens_per_step:.2f} tokens per verifier step; mean accepted length "
        f"{stats.mean_accepted_length:.2f}; acceptance per drafter: {per_drafter}; rule {rule}{lossy}]"
    )


def warm_up(lm, prompt_ids: list[int]) -> None:
    """One-time kernel set-up (first forwards of each shape are slow on CPU) stays out of tok/s,
    for --plain and speculative runs alike."""
    from .sampling.params import SamplingParams

    head = prompt_ids[:4]
    lm.plain_generate(head, 2, SamplingParams())  # multi-row prefill + one-row steps


def run_generate(args: argparse.Namespace) -> int:
    if getattr(args, "server", None):
        from .serve.cli_commands import generate_remote

        return generate_remote(args)

    from .engine import GenerationRequest, GenerationStats, RuleParams, SpeculativeEngine
    from .engine.factory import make_cascade, make_local_drafters
    from .engine.local import LocalDrafter, LocalVerifier
    from .models.causal_lm import CausalLM
    from .sampling.params import SamplingParams

    sampling = SamplingParams(args.temperature, args.top_k, args.top_p)
    rule = args.rule or ("greedy" if sampling.greedy else "sps")
    rule_params = RuleParams()
    for field, value in (("delta", args.delta), ("tas_epsilon", args.tas_epsilon), ("tas_alpha", args.tas_alpha)):
        if value is not None:
            setattr(rule_params, field, value)
    lm = CausalLM.load(args.verifier, dtype=args.dtype, device=args.device)
    prompt_ids = encode_prompt(lm.tokenizer, args.prompt, chat=not args.no_chat)
    warm_up(lm, prompt_ids)
    stream = TextStream(lm.tokenizer, sys.stdout)
    stops = stop_ids(lm)

    if args.plain:
        started = time.perf_counter()
        # on the compute thread, like the engine's model work (models/compute.py)
        tokens = lm.plain_generate(prompt_ids, args.max_new_tokens, sampling, args.seed, stops)
        seconds = time.perf_counter() - started
        stream.add(tokens)
        stream.close()
        stats = GenerationStats(rounds=len(tokens), generated=len(tokens), seconds=seconds)
        print(summary_line(stats, seconds, rule, plain=True), file=sys.stderr)
        return 0

    specs = list(args.drafter or DEFAULT_DRAFTERS)
    if args.cascade:
        cascade = make_cascade(specs, lm, args.draft_length, args.cascade_k, args.lenience)
        drafters = [LocalDrafter(cascade)]
    else:
        drafters = make_local_drafters(specs, lm)
    if args.decision_model:
        attach_decision_model(args.decision_model, [d.drafter for d in drafters])
    ahead = args.ahead or ("full-acceptance" if args.overlap else "none")
    engine = SpeculativeEngine(LocalVerifier(lm), drafters, dynamic_length=not args.fixed_length,
                               ahead=None if ahead == "none" else ahead,
                               min_draft_confidence=args.min_draft_confidence)
    request = GenerationRequest(
        prompt_ids=prompt_ids,
        max_new_tokens=args.max_new_tokens,
        sampling=sampling,
        rule=rule,
        rule_params=rule_params,
        draft_length=args.draft_length,
        tree_config=args.tree,
        seed=args.seed,
        stop_token_ids=stops,
    )
    stats = GenerationStats()
    started = time.perf_counter()
    for result in engine.generate(request, stats):
        stream.add(result.tokens)
    seconds = time.perf_counter() - started
    stream.close()
    print(summary_line(stats, seconds, rule), file=sys.stderr)
    return 0


def attach_decision_model(path: str, drafters) -> None:
    """Give every LM drafter the MCSD early-stop model at `path` (its hidden size must match)."""
    from .models.drafters import LMDrafter
    from .sampling.mcsd import DecisionModel

    model = DecisionModel.load(path)
    lm_drafters = [d for d in drafters if isinstance(d, LMDrafter)]
    problem = "" if lm_drafters else "no LM drafter to attach it to"
    for drafter in lm_drafters:
        hidden = drafter.lm.model.config.hidden_size
        if hidden != model.hidden_size:
            problem = f"trained on hidden size {model.hidden_size}, drafter {drafter.name} has {hidden}"
        drafter.decision_model = model
    if problem:  # the same exit status and form as argparse's own errors
        print(f"specserve generate: error: argument --decision-model: {problem}", file=sys.stderr)
        raise SystemExit(2)


# ---- train-decision-model ---------------------------------------------------------------------
def run_train_decision_model(args: argparse.Namespace) -> int:
    from .engine.decision_data import collect_and_train

    path, examples, loss = collect_and_train(args)
    print(f"[decision model saved to {path}: {examples} drafted tokens, final BCE {loss:.4f}]", file=sys.stderr)
    return 0


def check_generate_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Checks that need several arguments at once; argparse-style errors (exit 2)."""
    if args.lenience < 1:
        parser.error(f"argument --lenience: must be >= 1, got {args.lenience}")
    if args.rule == "greedy" and args.temperature > 0:
        parser.error("argument --rule: greedy needs --temperature 0 (use sps to sample losslessly)")
    if args.rule in ("rrs", "rrs-wor", "spechub") and args.temperature == 0:
        parser.error(f"argument --rule: {args.rule} verifies sampled siblings; it needs --temperature > 0")
    if args.rule == "spechub" and args.tree and any(k not in (1, 2) for k in args.tree):
        parser.error(f"argument --tree: spechub trees are binary (1 or 2 children per level), got {args.tree}")
    if args.tree and args.cascade:
        parser.error("argument --tree: not with --cascade (a cascade drafts one chain)")
    if args.rule == "mcsd-ti" and args.tree and len(args.tree) != 1:
        parser.error(
            f"argument --tree: mcsd-ti takes one number, the root width W (fork-shaped tree W,1,1,..), got {args.tree}"
        )
    if args.rule == "mcsd-ti" and args.cascade:
        parser.error("argument --cascade: not with mcsd-ti (each root gets its own drafted chain)")
    if args.plain and (args.drafter or args.cascade or args.tree):
        parser.error("argument --plain: plain decoding uses no drafters (drop --drafter/--cascade/--tree)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "generate" and not getattr(args, "server", None):
        check_generate_args(args, parser.choices_generate)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
