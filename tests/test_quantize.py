"""--quantize int8 / int4 / fp8 (core/quantize.py): what they cost in quality, bounded, and that a
user gets them through `run` and through `serve` with expert workers (real Ray, real gRPC), at a
quarter (an eighth) of fp32's bytes.

int8's bound, per position: the largest logit error at most 4% of the largest |logit|, the KL
divergence of the next-token distributions (fp32 || int8) at most 1e-3 nats on average and 5e-3 at
worst, and the greedy choice the same at 90% of positions or more. Measured here: 1.1-2.6% of the
logit range, KL 1e-6-6e-5 on average, greedy choices 98-100% the same (the random test models' logits
are nearly flat, so their top two are often within the error of each other). int4's and fp8's: BOUNDS
below.
"""

from __future__ import annotations

import json
import subprocess
import sys

import grpc
import pytest
import torch

from expertmesh.core.checkpoint import Checkpoint
from expertmesh.core.grouped_experts import fused_expert
from expertmesh.core.tiny_checkpoint import write_tiny_checkpoint
from expertmesh.core.tokenizer import load_tokenizer
from expertmesh.router.engine import Engine
from expertmesh.router.sampling import SamplingParams
from expertmesh.router.serving import ServingEngine
from expertmesh.v1 import generation_pb2 as pb
from expertmesh.v1 import generation_pb2_grpc as pb_grpc
from tests.gateway_server import ServerProcess
from tests.helpers import greedy_tokens, prompt_logits

TEXT = ("The mixture of experts layer routes each token to two of its eight experts and adds their outputs, "
        "weighted by the renormalised scores of the router. Serving such a model on a cluster means sending "
        "hidden states to the workers that hold the experts and combining what comes back.")
PROMPTS = [[1, 415, 2936, 9060, 285, 1142], [1, 330, 1234, 5678], [1, 22557, 28725]]


def quality(reference: torch.Tensor, quantized: torch.Tensor) -> dict:
    """Logits (n, V) of the same positions -> the figures the bound is stated in."""
    log_p, log_q = reference.log_softmax(-1), quantized.log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return {"max_logit_error": (reference - quantized).abs().max().item() / reference.abs().max().item(),
            "kl_mean": kl.mean().item(), "kl_max": kl.max().item(),
            "greedy_agreement": (reference.argmax(-1) == quantized.argmax(-1)).float().mean().item()}


BOUNDS = {  # upper bounds, but greedy_agreement: a lower bound
    "int8": {"max_logit_error": 0.04, "kl_mean": 1e-3, "kl_max": 5e-3, "greedy_agreement": 0.9},
    # int4 loses far more on these models (measured: KL 2e-4 on the text, 0.017-0.06 on transformers'
    # configs, whose rows of 64-96 columns are 2-3 groups of random x4 weights); a broken packing or
    # scale gives KL of nats, which this still catches
    "int4": {"max_logit_error": 1.5, "kl_mean": 0.1, "kl_max": 0.5, "greedy_agreement": 0.3},
    # fp8 e4m3 keeps 3 mantissa bits: between the two (measured: 8.7% of the logit range and KL 2e-5 on
    # the text, 8-25% and KL 1e-3-3e-3 on average, 0.016 at worst, on transformers' configs)
    "fp8": {"max_logit_error": 0.4, "kl_mean": 0.01, "kl_max": 0.05, "greedy_agreement": 0.4},
    # w8a8: int8's weights and x on int8 grids per block of 32 (llama.cpp's Q8_0 arithmetic). Measured:
    # within int8's bound on the text (1.2% of the logit range, KL 1e-6); on transformers' configs 2.4-2.8%
    # and KL 7e-5-1e-4, but on gqa1_top2 one position of twelve routes another way (61% there, KL 7e-3
    # on average): sharp random weights put tokens near the gate's ties, which x's grid tips
    "w8a8": {"max_logit_error": 0.8, "kl_mean": 0.01, "kl_max": 0.1, "greedy_agreement": 0.9},
    # w4a8: int4's weights, x as w8a8's: held to int4's bound
    "w4a8": {"max_logit_error": 1.5, "kl_mean": 0.1, "kl_max": 0.5, "greedy_agreement": 0.3},
}


W8A8_DECODE_PREFILL = {"median": 0.05, "p90": 0.2}  # |logprob decoded - prefilled|, nats


def within_bound(figures: dict, quantize: str) -> bool:
    bound = BOUNDS[quantize]
    return all(figures[name] <= bound[name] for name in ("max_logit_error", "kl_mean", "kl_max")) and \
        figures["greedy_agreement"] >= bound["greedy_agreement"]


@pytest.mark.parametrize("quantize", ["int8", "int4", "fp8", "w8a8", "w4a8"])
def test_quantized_logits_over_a_text_stay_within_the_bound(tiny_checkpoint, quantize):
    ids = [1, *load_tokenizer(tiny_checkpoint).encode(TEXT)]
    figures = quality(prompt_logits(Engine.local(tiny_checkpoint), ids),
                      prompt_logits(Engine.local(tiny_checkpoint, quantize=quantize), ids))
    print(f"{quantize} vs fp32 over {len(ids)} tokens: {figures}")
    assert within_bound(figures, quantize), figures
    assert figures["max_logit_error"] > 0, "the weights were quantized"


@pytest.mark.parametrize("quantize", ["int8", "int4", "fp8", "w8a8", "w4a8"])
def test_quantized_against_transformers_fp32_stays_within_the_bound(hf_checkpoint, quantize):
    model, path = hf_checkpoint[:2]
    ids = [1, 17, 200, 45, 99, 3, 250, 128, 64, 7, 31, 180]
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].float()
    figures = quality(expected, prompt_logits(Engine.local(path, quantize=quantize), ids))
    print(f"{quantize} vs transformers fp32: {figures}")
    assert within_bound(figures, quantize), figures


def decoded_and_prefilled(tmp_path, quantize: str) -> list[tuple[float, float]]:
    """(logprob as decoded, as prefilled) of each of 60 greedy tokens after each of PROMPTS: the same
    tokens one step at a time (decode: one row per step), then in one prefill (many rows). A model
    with sharper activations than the shared tiny one (init_std 0.1), where a row's largest value
    stands out."""
    path = write_tiny_checkpoint(tmp_path, hidden_size=256, intermediate_size=512, num_layers=4, num_heads=8,
                                 num_kv_heads=2, head_dim=32, init_std=0.1)
    serving = ServingEngine(Engine.local(path, quantize=quantize), load_tokenizer(path), own_thread=False)
    decoded = serving.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=60, ignore_eos=True,
                                                       logprobs=0))
    tokens = [[t for c in chunks for t in c.token_ids] for chunks in decoded]
    prefilled = serving.generate([p + t for p, t in zip(PROMPTS, tokens)],
                                 SamplingParams(max_new_tokens=1, prompt_logprobs=0))
    pairs = []
    for prompt, chunks, again in zip(PROMPTS, decoded, prefilled):
        as_decoded = [lp.logprob for c in chunks for lp in c.logprobs]
        as_prefilled = [lp.logprob for lp in again[0].prompt_logprobs[len(prompt):]]
        assert len(as_decoded) == len(as_prefilled) == 60
        pairs += zip(as_decoded, as_prefilled)
    return pairs


@pytest.mark.parametrize("quantize", ["none", "int8", "int4"])
def test_tokens_decoded_and_prefilled_get_the_same_logprobs(tmp_path, quantize):
    """Decode and prefill take different fp32 roundings before each layer; quantized layers must not
    amplify them. With x on one int16 digit they did: 0.9-1.2e-3 here (1e-2 on a longer run), enough
    for a recompute after preemption or another batch to change a greedy token; two digits: 6-9e-6,
    as fp32."""
    assert max(abs(a - b) for a, b in decoded_and_prefilled(tmp_path, quantize)) < 1e-4


@pytest.mark.parametrize("quantize", ["w8a8", "w4a8"])
def test_byte_activations_decoded_and_prefilled_differ_as_the_docs_say(tmp_path, quantize):
    """w8a8's and w4a8's price: x on 8-bit grids per block tips with those fp32 roundings, so a token
    decoded and the same token prefilled differ by more than fp32's rounding (docs/performance.md:
    the median and the 90th percentile here), as in llama.cpp; within this bound, and visibly not
    int8's or int4's."""
    gaps = sorted(abs(a - b) for a, b in decoded_and_prefilled(tmp_path, quantize))
    median, p90 = gaps[len(gaps) // 2], gaps[len(gaps) * 9 // 10]
    assert median < W8A8_DECODE_PREFILL["median"] and p90 < W8A8_DECODE_PREFILL["p90"], (median, p90, gaps[-1])
    assert gaps[-1] > 1e-4, "x was not put on int8 grids"


def test_quantized_engines_cannot_take_the_graphs_path(tiny_checkpoint):
    with pytest.raises(ValueError, match="quantize"):
        Engine.local(tiny_checkpoint, graphs=True, quantize="int8")


def expertmesh(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "expertmesh.cli", *args], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    return result


@pytest.mark.slow
@pytest.mark.parametrize("quantize,fraction", [("int8", 1 / 3.5), ("int4", 1 / 6.5), ("fp8", 1 / 3.5),
                                               ("w8a8", 1 / 3.5), ("w4a8", 1 / 6.5)])
def test_run_and_serve_with_quantized_workers_give_the_in_process_tokens(tiny_checkpoint, quantize, fraction):
    """The same quantized weights on workers as in one process: the same greedy tokens (each row's sums
    run in one order whatever batch it is in), through `run` and through `serve --workers 2` over
    gRPC; `info` reports each worker's bytes as held: about a quarter of fp32's (int8, fp8), an eighth (int4)."""
    expected = greedy_tokens(Engine.local(tiny_checkpoint, quantize=quantize), PROMPTS, 12)
    run = json.loads(expertmesh("run", "--model", str(tiny_checkpoint), "--quantize", quantize, "--prompt-ids",
                                ",".join(map(str, PROMPTS[0])), "--max-new-tokens", "12", "--json").stdout)
    assert run["token_ids"] == expected[0][:len(run["token_ids"])]  # (run stops at EOS)
    assert len(run["token_ids"]) == 12 or run["token_ids"][-1] == 2
    server = ServerProcess("--model", str(tiny_checkpoint), "--workers", "2", "--quantize", quantize)
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.GenerationStub(channel)
            sampling = pb.SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)
            got = [[t for r in stub.Generate(pb.GenerateRequest(token_ids=p, sampling=sampling), timeout=120)
                    for t in r.token_ids] for p in PROMPTS]
        assert got == expected
        info = json.loads(expertmesh("info", "--target", server.target, "--json").stdout)
    finally:
        assert server.stop() == 0
    checkpoint = Checkpoint(tiny_checkpoint)
    for worker in info["workers"]:
        pairs = [tuple(map(int, name.split(":"))) for name in worker["experts"]]
        weights = checkpoint.read_experts(pairs, torch.float32)
        held = sum(layer.nbytes for p in pairs for layer in fused_expert(*weights[p], quantize))
        fp32 = sum(w.numel() * 4 for p in pairs for w in weights[p])
        assert worker["weight_bytes"] == held and held < fp32 * fraction, (worker["weight_bytes"], held, fp32)
