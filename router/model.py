"""Mixtral without its experts: embeddings, attention with the KV cache, gate, final norm, lm_head.

The experts come in from outside through an object with `start`/`finish` (local weights in one
process, or expert workers over collectives), so this file knows nothing of
Ray or torch.distributed. Shape legend: T tokens (flat rows of all sequences), D hidden,
H/G query/kv heads, Dh head dim, K experts per token, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from expertmesh.core import cpu_kernels
from expertmesh.core.checkpoint import Checkpoint
from expertmesh.core.config import MixtralConfig
from expertmesh.core.heap import release_free_heap
from expertmesh.core.linear import Linear
from expertmesh.core.moe_math import rms_norm, top_k_gating
from expertmesh.router.attention import AttentionBatch, Rope, paged_attention
from expertmesh.router.kv_cache import KVCache


class Experts(Protocol):
    """Where the experts run: in this process (router/local_experts.py) or on expert workers
    (router/dispatcher.py). start() may return before the result exists; finish() waits for it."""

    def start(self, layer: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> Any:
        """x (T, D), gate weights (T, K) fp32, expert ids (T, K) -> a handle for finish()."""

    def finish(self, handle: Any) -> torch.Tensor:
        """-> sum over k of weights[:, k] * expert_{ids[:, k]}(x), (T, D) fp32."""


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # (D,)
    post_attention_norm: torch.Tensor  # (D,)
    qkv: Linear  # (H*Dh + 2*G*Dh, D): q, k and v projections stacked for one GEMM
    o: Linear  # (D, H*Dh)
    gate: Linear  # (E, D)


class RouterModel:
    def __init__(self, config: MixtralConfig, tensors: dict[str, torch.Tensor], quantize: str = "none"):
        """quantize: "int8" or "int4" for qkv, o and the lm_head (core/quantize.py); the gate, 8 rows
        that decide where every token goes, stays in the checkpoint's dtype."""
        self.config = config
        self.embed = tensors["model.embed_tokens.weight"]  # (V, D)
        self.final_norm = tensors["model.norm.weight"]
        self.lm_head = Linear(tensors.get("lm_head.weight", self.embed), quantize)  # (V, D); tied when absent
        self.dtype = self.embed.dtype
        self.layers = []
        for i in range(config.num_layers):
            p = f"model.layers.{i}."
            self.layers.append(LayerWeights(
                input_norm=tensors[p + "input_layernorm.weight"],
                post_attention_norm=tensors[p + "post_attention_layernorm.weight"],
                qkv=Linear(torch.cat([tensors.pop(p + f"self_attn.{n}_proj.weight") for n in "qkv"]), quantize),
                o=Linear(tensors.pop(p + "self_attn.o_proj.weight"), quantize),
                gate=Linear(tensors[p + "block_sparse_moe.gate.weight"]),
            ))
        self.device = self.embed.device
        self.rope = Rope(config.head_dim, config.rope_theta, config.max_position_embeddings, self.device)

    @property
    def nbytes(self) -> int:
        """The bytes held: embeddings, lm_head, attention, gates, norms and the rotary tables."""
        return (self.embed.nbytes + self.final_norm.nbytes + self.lm_head.nbytes + self.rope.cos.nbytes
                + self.rope.sin.nbytes + sum(w.qkv.nbytes + w.o.nbytes + w.gate.nbytes + w.input_norm.nbytes
                                             + w.post_attention_norm.nbytes for w in self.layers))

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint, dtype: torch.dtype, device: str | torch.device = "cpu",
                        quantize: str = "none") -> "RouterModel":
        model = cls(checkpoint.config, {k: t.to(device) for k, t in checkpoint.read_dense(dtype).items()}, quantize)
        release_free_heap()  # the load's transients
        return model

    def embed_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.embed[token_ids.to(self.device)]  # (T,) -> (T, D)

    def attention_block(self, layer: int, h: torch.Tensor, batch: AttentionBatch,
                        cache: KVCache) -> torch.Tensor:
        """h (T, D) -> h + attention(rmsnorm(h)) (T, D); writes this step's k/v into the cache."""
        c, w = self.config, self.layers[layer]
        x = rms_norm(h, w.input_norm, c.rms_norm_eps)
        qkv = w.qkv(x)  # (T, (H + 2G) Dh)
        kernels = cpu_kernels.for_rows(qkv) if batch.all_decode else None
        if kernels is not None:  # a decode step on the CPU: rotary, cache write, attention in 2 calls
            k_cache, v_cache = cache.k[layer], cache.v[layer]
            # the C code trusts its indices: no position past the rotary tables (max context)
            assert batch.decode_slots.shape[1] <= self.rope.cos.shape[0], batch.decode_slots.shape
            kernels.rope_store(qkv, batch.positions, batch.slot_mapping, self.rope.cos, self.rope.sin,
                               k_cache, v_cache, c.num_heads)
            o = kernels.decode_attention(qkv, k_cache, v_cache, batch.decode_slots, batch.decode_lens,
                                         c.num_heads, c.sliding_window)
            return h + w.o(o)
        if batch.rope is None:  # the same for every layer of the step
            batch.rope = self.rope.tables(batch.positions, h.dtype)
        # q and k heads rotated in one call: (T, H + G, Dh)
        qk = self.rope.apply(qkv[:, :c.q_size + c.kv_size].view(-1, c.num_heads + c.num_kv_heads, c.head_dim),
                             *batch.rope)
        q, k = qk.split([c.num_heads, c.num_kv_heads], dim=1)  # (T, H, Dh), (T, G, Dh)
        cache.write(layer, batch.slot_mapping, k, qkv[:, c.q_size + c.kv_size:].view(-1, c.num_kv_heads, c.head_dim))
        o = paged_attention(q, cache.k[layer], cache.v[layer], batch)
        return h + w.o(o.reshape(-1, c.q_size))

    def moe_input(self, layer: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h (T, D) -> expert input x (T, D), gate weights (T, K) fp32, expert ids (T, K)."""
        w = self.layers[layer]
        x = rms_norm(h, w.post_attention_norm, self.config.rms_norm_eps)
        weights, ids = top_k_gating(w.gate(x), self.config.experts_per_token)
        return x, weights, ids

    def forward(self, micro_batches: list[tuple[torch.Tensor, AttentionBatch]], cache: KVCache,
                experts: Experts) -> list[torch.Tensor]:
        """Each micro-batch's token_ids (T_i,) -> final hidden states (T_i, D).

        With two micro-batches this is the ping-pong schedule: while one is at the experts
        (experts.start ... experts.finish), the other runs its attention. With one it is the plain
        layer-by-layer loop.
        """
        hs = [self.embed_tokens(ids) for ids, _ in micro_batches]
        pending = [None] * len(micro_batches)
        for layer in range(self.config.num_layers):
            for i, (_, batch) in enumerate(micro_batches):
                if pending[i] is not None:  # the previous layer's experts for this micro-batch
                    hs[i] = hs[i] + experts.finish(pending[i]).to(hs[i].dtype)
                hs[i] = self.attention_block(layer, hs[i], batch, cache)
                pending[i] = experts.start(layer, *self.moe_input(layer, hs[i]))
        return [h + experts.finish(p).to(h.dtype) for h, p in zip(hs, pending)]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """h (N, D) -> logits (N, V) in fp32."""
        return self.lm_head(rms_norm(h, self.final_norm, self.config.rms_norm_eps)).float()
