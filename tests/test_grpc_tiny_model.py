"""End to end over gRPC with REAL engine backends: a tiny random fp32 Llama (vocab = the byte tokenizer's
257 ids) behind LocalVerifier, early-exit and prompt-lookup drafters in LocalDrafter, the engine's
DecodeLoop, the standalone server and the client. Greedy output must equal plain greedy decoding."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from specserve.client import SpecServeClient
from specserve.engine.local import LocalDrafter, LocalVerifier
from specserve.engine.loop import DecodeLoop
from specserve.models.causal_lm import CausalLM
from specserve.models.drafters import EarlyExitDrafter
from specserve.models.ngram import PromptLookupDrafter
from specserve.sampling.params import SamplingParams
from specserve.serve.grpc_server import model_info_for
from specserve.serve.service import GenerationService
from test_grpc_support import VOCAB, ServerThread, byte_tokenizer


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
    )
    lm = CausalLM(LlamaForCausalLM(config).float(), byte_tokenizer(), name="tiny")
    drafters = [LocalDrafter(EarlyExitDrafter(lm, 1)), LocalDrafter(PromptLookupDrafter(name="prompt-lookup"))]
    loop = DecodeLoop(LocalVerifier(lm), drafters, dynamic_length=False)  # timing-free drafting: repeatable
    service = GenerationService(loop, lm.tokenizer, model_info_for(lm, tuple(d.name for d in drafters)))
    with ServerThread(service) as server:
        yield lm, server


def test_greedy_over_grpc_equals_plain_greedy(tiny):
    lm, server = tiny
    prompt = "abc abc abc abd"
    ids = lm.tokenizer.encode(prompt)
    want = lm.plain_generate(ids, 30, SamplingParams(), stop_ids=[lm.tokenizer.eos_token_id])
    with SpecServeClient(server.target, timeout=60) as client:
        for rule in ("greedy", "sps"):
            chunks = list(client.generate_stream(prompt, max_new_tokens=30, rule=rule, draft_length=3))
            assert [t for c in chunks for t in c.token_ids] == want, rule
            stats = chunks[-1].stats
            assert stats.drafted > 0 and set(stats.drafters) <= {"early-exit:1", "prompt-lookup"}
            assert stats.generated_tokens == len(want)


def test_sampled_runs_repeat_with_the_same_seed(tiny):
    _, server = tiny
    with SpecServeClient(server.target, timeout=60) as client:
        runs = [
            list(client.generate("hello", max_new_tokens=20, temperature=1.0, top_p=0.9, rule=rule, seed=11).token_ids)
            for rule in ("sps", "sps", "rrs")
        ]
        assert runs[0] == runs[1] and len(runs[0]) == 20 and len(runs[2]) == 20
