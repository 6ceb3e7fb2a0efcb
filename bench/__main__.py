"""`python -m bench {speed,quality,overhead,rows,kernels,round,batch,report,plots}` (see BENCHMARKS.md for the exact runs)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .prompts import CATEGORIES, DEFAULT_PROMPTS

HERE = Path(__file__).resolve().parent


def _floats(s: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None


def _names(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _categories(s: str) -> tuple[str, ...]:
    cats = tuple(_names(s))
    bad = [c for c in cats if c not in CATEGORIES]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown categories {bad}; choose from {list(CATEGORIES)}")
    return cats


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompts", default=str(DEFAULT_PROMPTS), help="Spec-Bench jsonl (default: %(default)s)")
    p.add_argument("--per-category", type=int, default=2, help="prompts per Spec-Bench category")
    p.add_argument("--categories", type=_categories, default=None, help=f"subset of {','.join(CATEGORIES)}")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-prompt-tokens", type=int, default=1024, help="cut longer prompts (rag, summarization)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="result JSON path")
    p.add_argument("--into", default=None, help="Markdown file to update (e.g. BENCHMARKS.md)")
    p.add_argument("--block", default=None, help="block name inside --into")
    p.add_argument("--plots", default=None, metavar="TAG", help="also write bench/plots/TAG_*.png")


def _models(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verifier", default="smollm2-135m")
    p.add_argument("--drafter", default=None, help="small LM sharing the tokenizer (default: early exit)")
    p.add_argument("--early-exit", type=int, default=8, help="layers of the early-exit drafter")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--device", default="cpu", help='"cuda" on a GPU machine (default cpu)')


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    sp = sub.add_parser("speed", help="speedup per Spec-Bench category, ours vs plain vs transformers")
    _models(sp)
    _common(sp)
    sp.add_argument("--methods", type=_names, default=None, help="comma-separated (default: all applicable)")
    sp.add_argument("--temperatures", type=_floats, default=(0.0, 1.0))
    sp.add_argument("--draft-length", type=int, default=16, help="maximum depth (the dynamic length picks)")
    sp.add_argument("--cactus-deltas", type=_floats, default=(0.5, 1.0))
    sp.add_argument("--cascade-lenience", type=float, default=2.0)
    sp.add_argument("--fixed-length", action="store_true", help="turn off dynamic draft length")

    qp = sub.add_parser("quality", help="lossy rules: per-step KL on real rows, answer agreement")
    _models(qp)
    _common(qp)
    qp.add_argument("--deltas", type=_floats, default=(0.1, 0.25, 0.5, 1.0))
    qp.add_argument("--draft-length", type=int, default=4)

    op = sub.add_parser("overhead", help="in-process engine vs standalone gRPC (and Ray Serve)")
    op.add_argument("--model", default="smollm2-135m")
    op.add_argument("--early-exit", type=int, default=8)
    op.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16"])
    op.add_argument("--port", type=int, default=20461)
    op.add_argument("--ray", action="store_true", help="also through the Ray Serve app")
    op.add_argument("--repeats", type=int, default=2)
    op.add_argument("--drafter", default=None,
                    help="an LM drafter (MODEL@int8 ...) instead of the verifier's early exit (the app's medium deployment)")
    op.add_argument("--ray-setups", default=None,
                    help="comma list of bench/overhead.py RAY_SETUPS to run with --ray (default: all)")
    _common(op)

    cp = sub.add_parser("rows", help="cost of a verification pass over 1 + k rows vs one plain step")
    cp.add_argument("--model", default="smollm2-135m")
    cp.add_argument("--context", type=int, default=300)
    cp.add_argument("--repeats", type=int, default=5)
    cp.add_argument("--threads", type=int, default=None)
    cp.add_argument("--out", default=None)
    cp.add_argument("--into", default=None)
    cp.add_argument("--block", default=None)
    cp.add_argument("--plots", default=None)

    kp = sub.add_parser("kernels", help="drafter cost per token per weight kernel (fp32, int8, int4) vs a verifier step")
    kp.add_argument("--verifier", default="qwen2.5-coder-1.5b")
    kp.add_argument("--drafter", default="qwen2.5-coder-0.5b")
    kp.add_argument("--context", type=int, default=300)
    kp.add_argument("--steps", type=int, default=10)
    kp.add_argument("--threads", type=int, default=None)
    kp.add_argument("--out", default=None)
    kp.add_argument("--into", default=None)
    kp.add_argument("--block", default=None)
    kp.add_argument("--plots", default=None)

    rc = sub.add_parser("round", help="a decode-loop round vs its forward passes (verifier-only and speculative)")
    rc.add_argument("--model", default="smollm2-135m")
    rc.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16"])
    rc.add_argument("--contexts", type=lambda s: tuple(int(x) for x in _names(s)), default=(300, 1000))
    rc.add_argument("--rounds", type=int, default=24)
    rc.add_argument("--depth", type=int, default=3)
    rc.add_argument("--early-exit", type=int, default=8)
    rc.add_argument("--repeats", type=int, default=3, help="alternations of plain / verifier-only / speculative")
    _common(rc)

    bp = sub.add_parser("batch", help="concurrent streams: speculative (with / without the load policy) vs plain, batched")
    bp.add_argument("--model", default="smollm2-135m")
    bp.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16"])
    bp.add_argument("--streams", type=lambda s: tuple(int(x) for x in _names(s)), default=(1, 2, 4, 8))
    bp.add_argument("--drafters", type=_names, default=["ngram", "suffix", "prompt-lookup"])
    bp.add_argument("--draft-length", type=int, default=16)
    bp.add_argument("--modes", type=lambda s: tuple(_names(s)), default=("plain", "spec-nocap", "spec"),
                    help="plain, spec-nocap, spec-noaudit (the cap without its realised-goodput audit), spec")
    bp.add_argument("--repeats", type=int, default=2,
                    help="runs of each mode per level, in mirrored order (cancels the VM's drift)")
    _common(bp)

    ap = sub.add_parser("ahead", help="drafting ahead on separate (pinned) cores: plain, sync, full-acceptance, enumerate-select")
    ap.add_argument("--verifier", default="qwen2.5-coder-1.5b")
    ap.add_argument("--drafter", default="qwen2.5-coder-0.5b@int8")
    ap.add_argument("--no-pin", action="store_true", help="do not pin the two compute lanes to their own CPUs")
    ap.add_argument("--units", type=int, default=8, help="enumerate-select: branches built per round")
    _common(ap)

    rp = sub.add_parser("report", help="Markdown tables from a result JSON")
    rp.add_argument("result")
    rp.add_argument("--into", default=None)
    rp.add_argument("--block", default=None)

    pp = sub.add_parser("plots", help="PNG plots from a result JSON")
    pp.add_argument("result")
    pp.add_argument("--tag", required=True)
    pp.add_argument("--out-dir", default=str(HERE / "plots"))
    return parser


def _finish(args, result: dict, default_name: str) -> None:
    from .report import render, update_block
    from .speed import save

    out = Path(args.out or HERE / "results" / f"{default_name}.json")
    save(result, out)
    text = render(result)
    print(text)
    print(f"\nwrote {out}", file=sys.stderr)
    if args.into:
        update_block(args.into, args.block or default_name, text)
    if args.plots:
        from .plots import plot_result

        for p in plot_result(result, HERE / "plots", args.plots):
            print(f"wrote {p}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.command == "report":
        from .report import render, update_block

        text = render(json.loads(Path(args.result).read_text()))
        print(text)
        if args.into:
            update_block(args.into, args.block or Path(args.result).stem, text)
        return 0
    if args.command == "plots":
        from .plots import plot_result

        for p in plot_result(json.loads(Path(args.result).read_text()), args.out_dir, args.tag):
            print(p)
        return 0

    from .prompts import load_prompts
    from .systems import set_threads

    set_threads(args.threads)
    if args.command == "kernels":
        from .kernels import run_kernels

        result = run_kernels(args.verifier, args.drafter, args.context, args.steps,
                             progress=lambda m: print(m, file=sys.stderr))
        _finish(args, result, f"kernels_{args.drafter.replace('/', '_')}")
        return 0
    if args.command == "rows":
        from .row_cost import run_row_cost

        result = run_row_cost(args.model, args.context, repeats=args.repeats, progress=lambda m: print(m, file=sys.stderr))
        _finish(args, result, f"rows_{args.model.replace('/', '_')}")
        return 0
    prompts = load_prompts(args.prompts, args.per_category, args.categories)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731

    if args.command == "round":
        from .round_cost import run_round_cost

        result = run_round_cost(args.model, [p.text for p in prompts], args.contexts, args.rounds, args.depth,
                                args.early_exit, args.dtype, args.repeats, progress=log)
        _finish(args, result, f"round_{args.model.replace('/', '_')}")
        return 0
    if args.command == "batch":
        from .batching import run_batching

        result = run_batching(args.model, prompts, args.streams, args.max_new_tokens, tuple(args.drafters),
                              args.draft_length, args.max_prompt_tokens, args.dtype, args.repeats, args.modes,
                              progress=log)
        _finish(args, result, f"batching_{args.model.replace('/', '_')}")
        return 0
    if args.command == "ahead":
        from .ahead import run_ahead

        result = run_ahead(args.verifier, args.drafter, prompts, args.max_new_tokens, args.max_prompt_tokens,
                           pin=not args.no_pin, units=args.units, progress=log)
        _finish(args, result, f"ahead_{args.verifier.replace('/', '_')}")
        return 0
    if args.command == "overhead":
        from .overhead import run_overhead

        result = run_overhead(args.model, prompts, args.max_new_tokens, args.early_exit, args.port,
                              args.ray, args.dtype, args.max_prompt_tokens, args.repeats, progress=log,
                              ray_setups=tuple(args.ray_setups.split(",")) if args.ray_setups else None,
                              drafter=args.drafter)
        _finish(args, result, "overhead")
        return 0

    from .systems import ModelSetup, Systems

    setup = ModelSetup(
        verifier_spec=args.verifier, drafter_spec=args.drafter, early_exit_layers=args.early_exit,
        dtype=args.dtype, device=args.device, cascade_lenience=getattr(args, "cascade_lenience", 2.0),
        dynamic_length=not getattr(args, "fixed_length", False),
        bigram_texts=[p.text for p in load_prompts(args.prompts)],  # Max-Gram's bigram fallback corpus
    )
    systems = Systems(setup)
    name = (args.verifier + ("__" + args.drafter if args.drafter else "")).replace("/", "_")
    if args.command == "speed":
        from .methods import catalogue, select
        from .speed import SpeedConfig, run_speed

        cat = catalogue(args.draft_length, args.cactus_deltas)
        names = args.methods or list(cat)
        methods = select(names, cat)
        config = SpeedConfig(max_new_tokens=args.max_new_tokens, temperatures=args.temperatures,
                             seed=args.seed, max_prompt_tokens=args.max_prompt_tokens)
        result = run_speed(systems, prompts, methods, config, progress=log)
        _finish(args, result, f"speed_{name}")
        return 0
    if args.command == "quality":
        from .quality import run_quality

        result = run_quality(systems, prompts, args.deltas, args.max_new_tokens, args.draft_length,
                             args.seed, args.max_prompt_tokens, progress=log)
        _finish(args, result, f"quality_{name}")
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
