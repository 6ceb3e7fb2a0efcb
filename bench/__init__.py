"""specserve benchmarks: Spec-Bench speedups vs plain decoding and vs transformers, lossy-rule
quality, distributed overhead, plots. Run `python -m bench --help`; results and the exact
commands are in BENCHMARKS.md.

    prompts.py     Spec-Bench prompts, the six categories, chat-template encoding
    methods.py     the methods compared (ours / plain / the transformers peer), as data
    systems.py     load models once, run a method on a prompt -> RunRecord
    peer.py        transformers assisted generation / prompt lookup, instrumented for counts
    stats.py       aggregation: tokens/s, speedup, tokens/step, acceptance (pure)
    speed.py       the speed benchmark loop
    divergence.py  exact one-step emitted laws of the lossy rules on full-vocabulary rows
    quality.py     Cactus/TAS vs SpS: per-step KL on real rows, answer agreement
    overhead.py    in-process vs gRPC (standalone, Ray Serve) per round
    report.py      Markdown tables, BENCHMARKS.md block updates
    plots.py       PNG plots
"""
