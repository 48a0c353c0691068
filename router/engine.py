"""One model step over flat token rows: the model, its experts and the KV cache.

The engine only computes, on one thread: the serving loop's (router/serving.py), which also applies
the control plane's changes to `experts` between steps. Which sequences run, how many tokens each,
and which KV blocks they use is the scheduler's (router/scheduler.py); sampling and streaming are
the serving loop's. The experts object decides where experts run (`LocalExperts` here, expert
workers in the distributed engine); everything else is the same code.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

import torch

from expertmesh.core.checkpoint import Checkpoint
from expertmesh.core.settings import DEFAULTS
from expertmesh.router import decode_graphs
from expertmesh.router.attention import AttentionBatch
from expertmesh.router.decode_graphs import DecodeGraphs
from expertmesh.router.kv_cache import KVCache
from expertmesh.router.local_experts import LocalExperts
from expertmesh.router.model import Experts, RouterModel

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FEW_LOGIT_ROWS = 2  # sequences whose logits run at layer_threads (see Engine.step)


@dataclass
class Sequence:
    """A request's tokens and where their k/v live; changed only by the scheduler and the serving loop."""
    token_ids: list[int]  # prompt + generated so far
    num_cached: int = 0  # tokens whose k/v are in the cache
    block_table: list[int] = field(default_factory=list)  # KV blocks, in order
    cache_salt: str = ""  # prefix-cache blocks are shared only between sequences with the same salt


def split_in_two(seqs: list[Sequence], new: list[int]) -> list[list[Sequence]]:
    """Two contiguous groups with about equal numbers of new tokens (order kept)."""
    total, running, cut = sum(new), 0, 1
    for i, n in enumerate(new[:-1]):
        running += n
        cut = i + 1
        if running * 2 >= total:
            break
    return [seqs[:cut], seqs[cut:]]


class Engine:
    def __init__(self, model: RouterModel, experts: Experts, cache: KVCache, pingpong: str = "off",
                 pingpong_min_tokens: int = DEFAULTS.pingpong_min_tokens, layer_threads: int | None = None):
        self.model = model
        # torch threads during the layer loop (None: leave as is). With expert workers on the same
        # CPUs, 1 keeps OpenMP's idle threads, which spin for a while after each parallel op, off the
        # cores the workers need while the router waits for them; the lm_head after it uses all.
        self.layer_threads = layer_threads
        # Split a step in two micro-batches that overlap at the experts: "on", "off", or "auto" =
        # only for steps of at least pingpong_min_tokens new tokens. Below that the experts are
        # memory-bound and a split reads every expert's weights twice (bench/dispatch.py).
        assert pingpong in ("on", "off", "auto") and pingpong_min_tokens >= 1, (pingpong, pingpong_min_tokens)
        self.pingpong = pingpong
        self.pingpong_min_tokens = pingpong_min_tokens
        self.experts = experts
        self.cache = cache
        self.config = model.config
        self.split_steps = 0  # steps run as two ping-pong micro-batches
        self.graphs: DecodeGraphs | None = None  # decode steps as captured graphs (Engine.local)

    @property
    def weight_bytes(self) -> int:
        """The weights this process holds: the router's, and the experts' when they are local."""
        return self.model.nbytes + getattr(self.experts, "nbytes", 0)

    @classmethod
    def local(cls, model_dir, dtype: torch.dtype = torch.float32, kv_blocks: int = 512,
              block_size: int = DEFAULTS.block_size, device: str | torch.device = "cpu",
              graphs: bool | None = None, quantize: str = "none") -> "Engine":
        """The reference engine: every weight of the checkpoint in this process (on `device`).

        graphs: decode steps of up to 32 sequences through router/decode_graphs.py; None: where
        CUDA graphs can be captured (CUDA, bf16). True on the CPU runs the same fixed-buffer path
        eagerly (for tests). quantize: "int8" holds the experts, attention and lm_head in int8
        (core/quantize.py); the graphs' grouped GEMMs read plain weights, so it turns them off."""
        device = torch.device(device)
        if graphs and quantize != "none":
            raise ValueError("decode graphs read unquantized stacked experts: graphs=True needs quantize='none'")
        if graphs is None:
            graphs = decode_graphs.available(device, dtype) and quantize == "none"
        checkpoint = Checkpoint(model_dir)
        model = RouterModel.from_checkpoint(checkpoint, dtype, device, quantize)
        experts = LocalExperts.from_checkpoint(checkpoint, dtype, device, stacked=graphs, quantize=quantize)
        engine = cls(model, experts, KVCache(checkpoint.config, kv_blocks, block_size, dtype, device))
        if graphs:
            engine.graphs = DecodeGraphs(model, experts, engine.cache, capture=device.type == "cuda")
        return engine

    @torch.inference_mode()
    def step(self, seqs: list[Sequence], num_new: list[int],
             all_logits: bool | Collection[int] = False) -> torch.Tensor | list[torch.Tensor]:
        """Compute the next num_new[i] uncached tokens of each sequence, whose block tables the
        scheduler has already grown to hold them; the sequences are not changed (the scheduler
        advances them). Returns the logits after each sequence's last computed token (S, V), row i
        for sequence i; with all_logits, per sequence the logits after each of its tokens (n, V):
        all_logits True for every sequence, or the indices of those that want them (the others get
        their last row alone (1, V), so the lm_head runs only over the rows someone reads).
        """
        block_size = self.cache.block_size
        for s, n in zip(seqs, num_new):
            assert 0 < n <= len(s.token_ids) - s.num_cached, (n, len(s.token_ids), s.num_cached)
            assert len(s.block_table) * block_size >= s.num_cached + n, "blocks are reserved before a step"
        return self._step(seqs, num_new, all_logits)

    def _step(self, seqs: list[Sequence], num_new: list[int], all_logits: bool) -> torch.Tensor | list[torch.Tensor]:
        if self.graphs is not None and not all_logits and self.graphs.covers(seqs, num_new):
            if self.graphs.cache is not self.cache:  # a new cache (benchmarks start fresh): new buffers
                self.graphs = DecodeGraphs(self.model, self.experts, self.cache, self.graphs.capture)
            return self.graphs.run(seqs)
        index = {id(s): i for i, s in enumerate(seqs)}
        groups = split_in_two(seqs, num_new) if self._split(num_new) else [seqs]
        if len(groups) > 1:
            self.split_steps += 1
        micro_batches = []
        for group in groups:
            lens = [num_new[index[id(s)]] for s in group]
            batch = AttentionBatch.build(self.cache, [s.block_table for s in group],
                                         [s.num_cached for s in group], lens, self.config.sliding_window)
            token_ids = torch.tensor([t for s, n in zip(group, lens)
                                      for t in s.token_ids[s.num_cached:s.num_cached + n]])
            micro_batches.append((token_ids, batch))
        # The logits of a few sequences (bandwidth-bound) run at layer_threads too: a second thread
        # gains little there, and its OpenMP spin afterwards takes the core a worker needs
        # (bench/latency.py: distributed decode at batch 1, 14 -> 11 ms a step).
        few = not all_logits and len(seqs) <= FEW_LOGIT_ROWS
        threads = torch.get_num_threads()
        if self.layer_threads:
            torch.set_num_threads(self.layer_threads)
        try:
            outputs = self.model.forward(micro_batches, self.cache, self.experts)
            h = outputs[0] if len(outputs) == 1 else torch.cat(outputs)  # (T, D)
            if few:
                return self._last_logits(h, num_new)
        finally:
            if self.layer_threads:
                torch.set_num_threads(threads)
        if all_logits is True:
            return list(self.model.logits(h).cpu().split(num_new))
        if all_logits:
            wanted = set(all_logits)
            ends = torch.tensor(num_new).cumsum(0).tolist()
            rows = [r for i, (n, end) in enumerate(zip(num_new, ends))
                    for r in (range(end - n, end) if i in wanted else (end - 1,))]
            sizes = [n if i in wanted else 1 for i, n in enumerate(num_new)]
            return list(self.model.logits(h[torch.tensor(rows)]).cpu().split(sizes))
        return self._last_logits(h, num_new)

    def _last_logits(self, h: torch.Tensor, num_new: list[int]) -> torch.Tensor:
        """The logits after each sequence's last computed token (S, V), on the CPU for sampling."""
        if len(num_new) == h.shape[0]:  # one row per sequence: nothing to pick
            return self.model.logits(h).cpu()
        ends = torch.tensor(num_new).cumsum(0)
        return self.model.logits(h[ends - 1]).cpu()

    def _split(self, num_new: list[int]) -> bool:
        if len(num_new) < 2 or self.pingpong == "off":
            return False
        return self.pingpong == "on" or sum(num_new) >= self.pingpong_min_tokens
