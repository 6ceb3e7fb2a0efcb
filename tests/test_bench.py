"""The benchmark runner works and its results are well formed and consistent (nothing about speed).

Fast tests use tiny random Llama models; the slow smoke test runs `python -m bench` end to end on
the embedded default (SmolLM2) with a handful of Spec-Bench prompts and tiny token counts.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bench.divergence import cactus_emitted, emitted_law, kl
from bench.systems import stop_token_ids
from bench.methods import catalogue, select
from bench.peer import PeerCounts
from bench.prompts import DEFAULT_PROMPTS, load_prompts
from bench.quality import drafted_positions, final_number, summarize_quality
from bench.report import update_block
from bench.stats import RunRecord, summarize
from bench.systems import ModelSetup, Systems
from specserve.engine import RoundResult
from specserve.models.causal_lm import CausalLM, truncated_copy
from specserve.sampling.closed_form import cactus_closed_form


# ---- pure pieces ----------------------------------------------------------------------------
def test_cactus_fast_law_matches_sampling_closed_form():
    """The O(V log V) emitted law equals sampling/'s O(V^2) closed form on random and peaked rows."""
    g = torch.Generator().manual_seed(0)
    for vocab, conc in ((6, 0.7), (40, 0.3), (120, 1.0)):
        for _ in range(4):
            t = torch.distributions.Dirichlet(torch.full((vocab,), conc)).sample()
            d = torch.distributions.Dirichlet(torch.full((vocab,), conc)).sample()
            d = 0.5 * d + 0.5 * torch.nn.functional.one_hot(torch.randint(vocab, (1,), generator=g), vocab)[0]
            for delta in (0.01, 0.2, 0.75, 2.0):
                law, acc = cactus_emitted(t, d, delta)
                ref_acc, ref_law = cactus_closed_form(t, d, delta)
                assert abs(acc - ref_acc) < 1e-6
                assert torch.allclose(law, ref_law, atol=1e-6)
                assert abs(float(law.sum()) - 1.0) < 1e-6


def test_cactus_fast_law_reproduces_algorithms_table_t1():
    t = torch.tensor([0.35, 0.30, 0.20, 0.10, 0.05])
    d = torch.tensor([0.80, 0.05, 0.05, 0.05, 0.05])
    for delta, acc, div in ((0.05, 0.7008, 0.0494), (0.10, 0.7633, 0.0982), (0.20, 0.8517, 0.1968)):
        law, a = cactus_emitted(t, d, delta)
        assert a == pytest.approx(acc, abs=1e-4)
        assert kl(law, t) == pytest.approx(div, abs=1e-4)
    law, a = emitted_law("tas", t, d)
    assert a == pytest.approx(0.95, abs=1e-6) and kl(law, t) == pytest.approx(0.5606, abs=1e-4)
    law, a = emitted_law("sps", t, d)
    assert a == pytest.approx(0.55, abs=1e-6) and kl(law, t) == pytest.approx(0.0, abs=1e-12)


def _rec(method, cat, qid, gen, secs, rounds, drafted=0, accepted=0, apos=(), dpos=(), temp=0.0):
    return RunRecord(method, cat, qid, temp, 10, gen, secs, rounds, drafted, accepted, list(apos), list(dpos))


def test_summary_arithmetic():
    recs = [
        _rec("plain", "qa", 1, 10, 2.0, 10), _rec("plain", "rag", 2, 10, 3.0, 10),
        _rec("chain", "qa", 1, 10, 1.0, 4, 12, 6, (4, 2), (4, 4)),
        _rec("chain", "rag", 2, 10, 1.5, 5, 10, 5, (3, 2), (5, 5)),
        _rec("ngram", "qa", 1, 10, 2.0, 10, 6, 0, (), (4, 2)),  # drafted, never accepted
    ]
    cells = {(c.method, c.category): c for c in summarize(recs)}
    qa = cells[("chain", "qa")]
    assert qa.tokens_per_second == pytest.approx(10.0)
    assert qa.speedup == pytest.approx(2.0)  # 10 t/s vs plain's 5 t/s
    assert qa.tokens_per_step == pytest.approx(2.5)
    assert qa.mean_accepted_length == pytest.approx(1.5)
    assert qa.acceptance_rate == pytest.approx(0.5)
    pooled = cells[("chain", "all")]
    assert pooled.speedup == pytest.approx((20 / 2.5) / (20 / 5.0))
    assert pooled.acceptance_per_position == pytest.approx([7 / 9, 4 / 9])
    assert cells[("plain", "all")].speedup == pytest.approx(1.0)
    assert cells[("ngram", "qa")].acceptance_per_position == [0.0, 0.0]
    assert cells[("ngram", "qa")].acceptance_rate == 0.0
    assert qa.decode_speedup is None  # no first-token times recorded: no decode-phase figure


def test_decode_phase_speedup_leaves_out_the_first_token():
    plain = _rec("plain", "qa", 1, 11, 6.0, 11)
    plain.first_token_seconds = 1.0  # 10 tokens in the 5 s after the first
    chain = _rec("chain", "qa", 1, 11, 5.0, 4, 8, 7, (3,), (4,))
    chain.first_token_seconds = 2.5  # e.g. a drafter's prefill: 10 tokens in 2.5 s
    cells = {(c.method, c.category): c for c in summarize([plain, chain])}
    assert cells[("chain", "qa")].speedup == pytest.approx((11 / 5.0) / (11 / 6.0))
    assert cells[("chain", "qa")].decode_speedup == pytest.approx((10 / 2.5) / (10 / 5.0))


def test_peer_counts_per_position():
    c = PeerCounts()
    c.record_round(3, 2)
    c.record_round(1, 0)
    c.record_round(0, 0)
    assert (c.rounds, c.drafted, c.accepted) == (3, 4, 2)
    assert c.drafted_per_position == [2, 1, 1] and c.accepted_per_position == [1, 1, 0]


def test_drafted_positions_from_round_boundaries():
    rounds = [
        RoundResult(tokens=[5, 6, 7], num_drafted=4, num_accepted=2, drafted_depth=4),  # 2 acc + correction
        RoundResult(tokens=[8, 9, 1, 2, 3], num_drafted=4, num_accepted=4, drafted_depth=4),  # + bonus
        RoundResult(tokens=[4], num_drafted=0, num_accepted=0, drafted_depth=0),  # verifier only
    ]
    drafted, firsts = drafted_positions(rounds)
    assert drafted == [0, 1, 2, 3, 4, 5, 6]
    assert firsts == [0, 3]


def test_prompts_grouping(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [{"question_id": i, "category": c, "turns": [f"q{i}", "second"]}
            for i, c in enumerate(["writing", "writing", "coding", "qa", "qa", "rag"])]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    got = load_prompts(path, per_category=2)
    assert [(p.category, p.question_id) for p in got] == [
        ("mt_bench", 0), ("mt_bench", 2), ("qa", 3), ("qa", 4), ("rag", 5)]
    assert got[0].text == "q0"
    with pytest.raises(ValueError, match="unknown categories"):
        load_prompts(path, categories=("nope",))


def test_final_number_and_block_update(tmp_path):
    assert final_number("so 3 + 4 = 7, answer: 1,250.") == "1250"
    assert final_number("no digits") is None
    md = tmp_path / "B.md"
    md.write_text("# title\n")
    update_block(md, "x", "one")
    update_block(md, "x", "two")
    text = md.read_text()
    assert text.count("<!-- bench:x -->") == 1 and "two" in text and "one" not in text


def test_method_selection_always_includes_baseline():
    chosen = select(["chain", "hf-assisted"], catalogue())
    assert [m.name for m in chosen] == ["plain", "chain", "hf-assisted"]
    with pytest.raises(ValueError, match="unknown methods"):
        select(["warp-drive"], catalogue())


# ---- the runner on tiny random models ---------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_systems():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    verifier = CausalLM(LlamaForCausalLM(cfg).float(), None, name="tiny")
    return Systems(ModelSetup(verifier_spec="tiny", early_exit_layers=1), verifier=verifier,
                   drafter=truncated_copy(verifier, 1))


def test_runner_greedy_lossless_and_counts_consistent(tiny_systems):
    """Every lossless method reproduces plain greedy decoding; counts obey their identities."""
    prompt = [3, 17, 5, 9, 3, 17, 5, 22, 40, 3, 17]
    cat = catalogue(draft_length=3)
    names = ["plain", "chain", "tree-2x2", "cascade", "ngram", "prompt-lookup", "lm+ngram",
             "hf-plain", "hf-assisted", "hf-prompt-lookup"]
    recs = {n: tiny_systems.run(cat[n], prompt, 12, 0.0, seed=7, category="qa", question_id=1) for n in names}
    for name, r in recs.items():
        assert r.output_ids == recs["plain"].output_ids, name
        assert r.generated == 12 and r.seconds > 0 and 1 <= r.rounds <= 12 and r.drafter_failures == 0
        assert 0 < r.first_token_seconds < r.seconds, name  # the decode phase is timed for every system
        assert 0 <= r.accepted <= r.drafted
        if cat[name].system == "ours":  # each round commits its accepted drafts + one token
            assert r.generated == r.accepted + r.rounds
        assert len(r.accepted_per_position) <= len(r.drafted_per_position) or not r.drafted_per_position
        assert sum(r.accepted_per_position) == r.accepted
        assert all(a <= d for a, d in zip(r.accepted_per_position, r.drafted_per_position))
    assert recs["plain"].rounds == 12 and recs["hf-plain"].rounds == 12
    assert recs["hf-assisted"].drafted > 0  # the instrumentation saw transformers' drafts


def test_runner_sampled_rules_run(tiny_systems, caplog):
    """Every sampled method drafts (a drafter that raises is dropped by the loop with a warning:
    that would silently benchmark plain decoding)."""
    cat = catalogue(draft_length=3, cactus_deltas=(0.5,))
    for name in ["chain", "chain-cactus-0.5", "chain-tas", "tree-2x2", "tree-rrs-wor", "tree-spechub",
                 "hf-assisted"]:
        with caplog.at_level("WARNING"):
            r = tiny_systems.run(cat[name], [3, 17, 5, 9], 8, 1.0, seed=3)
        assert not [rec for rec in caplog.records if "dropped" in rec.getMessage()], name
        # 8 tokens, or fewer ending in a sampled stop token (which depends on the random stream)
        stopped = r.generated < 8 and r.output_ids[-1] in stop_token_ids(tiny_systems.verifier)
        assert (r.generated == 8 or stopped) and all(0 <= t < 96 for t in r.output_ids), name
        assert 0 <= r.accepted <= r.drafted and r.drafted > 0 and r.drafter_failures == 0, name


# ---- end to end on the embedded default -------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(not DEFAULT_PROMPTS.exists(), reason=f"Spec-Bench prompts not found at {DEFAULT_PROMPTS}")
def test_bench_cli_smoke_on_embedded_default(tmp_path):
    from bench.__main__ import main

    speed = tmp_path / "speed.json"
    md = tmp_path / "B.md"
    args = ["--per-category", "1", "--categories", "translation,qa", "--max-new-tokens", "6",
            "--dtype", "float32", "--into", str(md)]
    assert main(["speed", *args, "--out", str(speed), "--temperatures", "0",
                 "--methods", "chain,ngram,prompt-lookup,hf-assisted,hf-prompt-lookup"]) == 0
    result = json.loads(speed.read_text())
    recs = [RunRecord.from_json(r) for r in result["records"]]
    assert {r.method for r in recs} == {"plain", "chain", "ngram", "prompt-lookup", "hf-assisted",
                                        "hf-prompt-lookup"}
    assert {r.category for r in recs} == {"translation", "qa"}
    plain = {r.question_id: r.output_ids for r in recs if r.method == "plain"}
    for r in recs:
        assert r.generated == len(r.output_ids) and 1 <= r.generated <= 6
        assert 0 <= r.accepted <= r.drafted, f"{r.method}: only drafted tokens are accepted"
        if r.method in ("chain", "ngram", "prompt-lookup"):
            # ours commits exactly accepted + 1 tokens a round (drafts never reach past max_new_tokens - 1)
            assert r.generated == r.accepted + r.rounds, r.method
        elif r.method.startswith("hf-"):
            # transformers counts its own rounds: each emits its accepted drafts + 1 at most (a length
            # cut can shorten the last), so it ran at least one and no fewer than this
            assert r.rounds >= 1 and r.generated <= r.accepted + r.rounds, r.method
        assert r.output_ids == plain[r.question_id], r.method  # fp32 greedy: lossless everywhere
    text = md.read_text()
    assert "Speedup over plain decoding, greedy" in text and "hf-assisted" in text
    assert "Decode-phase speedup, greedy" in text

    quality = tmp_path / "quality.json"
    assert main(["quality", "--per-category", "1", "--categories", "math_reasoning", "--max-new-tokens", "6",
                 "--dtype", "float32", "--out", str(quality), "--deltas", "0.5"]) == 0
    q = json.loads(quality.read_text())
    from bench.plots import plot_result

    pngs = plot_result(result, tmp_path, "s") + plot_result(q, tmp_path, "q")
    assert len(pngs) == 3 and all(p.stat().st_size > 1000 for p in pngs)
    assert {r["method"] for r in q["rows"]} == {"sps", "cactus-0.5", "tas"}
    for r in q["rows"]:
        assert len(r["step_kl"]) == len(r["step_acceptance"]) <= r["generated"]
        assert all(k >= -1e-9 and math.isfinite(k) for k in r["step_kl"])
        if r["rule"] == "sps":
            assert all(abs(k) < 1e-9 for k in r["step_kl"])
    for s in summarize_quality(q):  # engine's measured acceptance vs closed form on the same rows
        assert s["acceptance_z"] is None or abs(s["acceptance_z"]) < 5, s


def test_row_cost_measures_dense_and_packed_layouts(tmp_path):
    from bench.row_cost import row_cost_report, run_row_cost
    from test_ray_app import save_tiny_model

    result = run_row_cost(save_tiny_model(str(tmp_path / "tiny")), context=16, nodes=(1, 4), repeats=2,
                          progress=lambda m: None, bf16=True)  # (bf16 runs everywhere, natively or not)
    assert set(result["rows"]) == {"dense F.linear", "oneDNN packed", "bf16"}
    for row in result["rows"].values():
        assert row["step_ms"] > 0 and set(row["tree_ms"]) == {1, 4} and all(v > 0 for v in row["tree_ms"].values())
    report = row_cost_report(json.loads(json.dumps(result)))  # as read back from a result file
    assert "| oneDNN packed |" in report and "| bf16 |" in report and "1 + 4 rows" in report
    assert result["meta"]["cpu"] in report  # the CPU and its ISA class beside the figures


@pytest.mark.slow
def test_batching_bench_smoke_on_embedded_default(tmp_path):
    from bench.__main__ import main

    out, md = tmp_path / "batch.json", tmp_path / "B.md"
    assert main(["batch", "--streams", "2", "--per-category", "1", "--categories", "translation,qa",
                 "--max-new-tokens", "6", "--repeats", "2", "--out", str(out), "--into", str(md), "--block", "b"]) == 0
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    first, second = row["orders"]
    assert row["streams"] == 2 and sorted(first) == ["plain", "spec", "spec-nocap"] and second == first[::-1]
    for mode in ("plain", "spec", "spec-nocap"):  # totals over both repeats, each repeat's rate kept
        assert len(row[mode]["runs_tokens_per_s"]) == 2 and len(row[mode]["runs_ratio"]) == 2
    assert row["same_tokens"]  # fp32 greedy: batching and caps change the speed, never the tokens
    for mode in ("plain", "spec", "spec-nocap"):
        assert row[mode]["tokens"] >= 2 and row[mode]["tokens_per_s"] > 0
    assert row["plain"]["mean_batch"] == 2.0  # two plain streams: every shared pass held both of them
    assert row["plain"]["ratio"] == 1.0
    assert "| 2 | " in md.read_text() and "goodput cap" in md.read_text() and "2 repeat(s)" in md.read_text()


def test_mirrored_orders_cancel_a_linear_drift():
    from bench.batching import MODES, mirrored_orders

    orders = mirrored_orders(1, 2)
    assert orders[0] == MODES[1:] + MODES[:1] and orders[1] == orders[0][::-1]
    # every mode's mean slot is the same over a mirrored pair: a drift linear in time costs each alike
    slots = {m: sum(o.index(m) for o in orders) for m in MODES}
    assert len(set(slots.values())) == 1
    assert mirrored_orders(0, 1) == [MODES]


def test_kernels_bench_measures_each_drafter_kernel_per_model_dtype(tmp_path):
    from bench.kernels import kernels_report, run_kernels
    from test_ray_app import save_tiny_model

    tiny = save_tiny_model(str(tmp_path / "tiny"))
    result = run_kernels(tiny, tiny, context=16, steps=2, progress=lambda m: None, bf16=True)
    assert set(result["verifier_ms_by_dtype"]) == {"float32", "bfloat16"}
    assert [(r["model_dtype"], r["scheme"]) for r in result["rows"]] == [
        ("float32", "fp32"), ("float32", "int8"), ("float32", "int4"),
        ("bfloat16", "bf16"), ("bfloat16", "int8"), ("bfloat16", "int4")]
    assert "fbgemm" in result["rows"][1]["kernels"] and "_weight_int8pack_mm" in result["rows"][4]["kernels"]
    report = kernels_report(json.loads(json.dumps(result)))
    assert "c (÷ bf16 verifier step)" in report and report.count("\n| ") == 6  # one line per kernel
    fp32_only = run_kernels(tiny, tiny, context=16, steps=2, progress=lambda m: None, bf16=False)
    assert len(fp32_only["rows"]) == 3 and "bf16 verifier" not in kernels_report(fp32_only)
