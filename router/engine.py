"""Generation in one process: batches of flat token rows through the model, the cache and sampling.

The experts object decides where experts run (`LocalExperts` here, expert workers in the
distributed engine); everything else is the same code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from cluster.checkpoint import Checkpoint
from router.attention import AttentionBatch
from router.kv_cache import KVCache
from router.local_experts import LocalExperts
from router.model import RouterModel
from router.sampling import RequestSampler, SamplingParams

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Sequence:
    token_ids: list[int]  # prompt + generated so far
    num_cached: int = 0  # tokens whose k/v are in the cache
    block_table: list[int] = field(default_factory=list)


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
    def __init__(self, model: RouterModel, experts, cache: KVCache, pingpong: str = "off",
                 pingpong_min_tokens: int = 256, layer_threads: int | None = None):
        self.model = model
        # torch threads during the layer loop (None: leave as is). With expert workers on the same
        # CPUs, 1 keeps OpenMP's idle threads, which spin for a while after each parallel op, off the
        # cores the workers need while the router waits for them; the lm_head after it uses all.
        self.layer_threads = layer_threads
        # Split a step in two micro-batches that overlap at the experts: "on", "off", or "auto" =
        # only for steps of at least pingpong_min_tokens new tokens. Below that the experts are
        # memory-bound and a split reads every expert's weights twice (bench/dispatch.py).
        if pingpong not in ("on", "off", "auto"):
            raise ValueError(f"pingpong must be 'on', 'off' or 'auto', got {pingpong!r}")
        if pingpong_min_tokens < 1:
            raise ValueError(f"pingpong_min_tokens must be >= 1, got {pingpong_min_tokens}")
        self.pingpong = pingpong
        self.pingpong_min_tokens = pingpong_min_tokens
        self.experts = experts
        self.cache = cache
        self.config = model.config

    @classmethod
    def local(cls, model_dir, dtype: torch.dtype = torch.float32, kv_blocks: int = 512,
              block_size: int = 16, device: str | torch.device = "cpu") -> "Engine":
        """The reference engine: every weight of the checkpoint in this process (on `device`)."""
        checkpoint = Checkpoint(model_dir)
        model = RouterModel.from_checkpoint(checkpoint, dtype, device)
        experts = LocalExperts.from_checkpoint(checkpoint, dtype, device)
        return cls(model, experts, KVCache(checkpoint.config, kv_blocks, block_size, dtype, device))

    @torch.inference_mode()
    def step(self, seqs: list[Sequence], num_new: list[int] | None = None,
             all_logits: bool = False) -> torch.Tensor | list[torch.Tensor]:
        """Compute the next num_new[i] uncached tokens of each sequence (default: all of them);
        blocks are added as needed (the scheduler reserves them first when serving). Returns the
        logits after each sequence's last computed token (S, V), row i for sequence i; with
        all_logits, per sequence the logits after each of its tokens (n, V).
        """
        if num_new is None:
            num_new = [len(s.token_ids) - s.num_cached for s in seqs]
        for s, n in zip(seqs, num_new):
            self.cache.grow(s.block_table, s.num_cached + n)
        index = {id(s): i for i, s in enumerate(seqs)}
        groups = split_in_two(seqs, num_new) if self._split(num_new) else [seqs]
        micro_batches = []
        for group in groups:
            lens = [num_new[index[id(s)]] for s in group]
            batch = AttentionBatch.build(self.cache, [s.block_table for s in group],
                                         [s.num_cached for s in group], lens, self.config.sliding_window)
            token_ids = torch.tensor([t for s, n in zip(group, lens)
                                      for t in s.token_ids[s.num_cached:s.num_cached + n]])
            micro_batches.append((token_ids, batch))
        threads = torch.get_num_threads()
        if self.layer_threads:
            torch.set_num_threads(self.layer_threads)
        try:
            h = torch.cat(self.model.forward(micro_batches, self.cache, self.experts))  # (T, D)
        finally:
            if self.layer_threads:
                torch.set_num_threads(threads)
        for s, n in zip(seqs, num_new):
            s.num_cached += n
        if all_logits:
            return list(self.model.logits(h).cpu().split(num_new))
        ends = torch.tensor(num_new).cumsum(0)
        return self.model.logits(h[ends - 1]).cpu()  # sampling runs on the CPU

    def _split(self, num_new: list[int]) -> bool:
        if len(num_new) < 2 or self.pingpong == "off":
            return False
        return self.pingpong == "on" or sum(num_new) >= self.pingpong_min_tokens

    def release(self, seqs: list[Sequence]) -> None:
        for s in seqs:
            self.cache.release(s.block_table)
            s.block_table = []

    def prompt_logits(self, token_ids: list[int]) -> torch.Tensor:
        """Logits at every position of one prompt, (n, V) fp32: a full prefill, cache freed after."""
        seq = Sequence(list(token_ids))
        try:
            return self.step([seq], all_logits=True)[0]
        finally:
            self.release([seq])

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                 seed: int | None = None, stop_at_eos: bool = True) -> list[list[int]]:
        """New tokens for each prompt, all prompts batched together (eos included when hit).
        The plain loop the tests and `expertmesh run` use; serving goes through router/serving.py."""
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        longest = max(len(p) for p in prompts) + max_new_tokens
        if longest > self.config.max_position_embeddings:
            raise ValueError(f"prompt + max_new_tokens ({longest}) exceeds the model's context "
                             f"({self.config.max_position_embeddings})")
        samplers = [RequestSampler(SamplingParams(temperature=temperature,
                                                  seed=None if seed is None else seed + i), p,
                                   self.config.vocab_size) for i, p in enumerate(prompts)]
        seqs = [Sequence(list(p)) for p in prompts]
        outputs: list[list[int]] = [[] for _ in prompts]
        running = list(range(len(prompts)))
        try:
            while running:
                logits = self.step([seqs[i] for i in running])
                still = []
                for i, row in zip(running, logits):
                    token, _ = samplers[i].sample(row)
                    outputs[i].append(token)
                    seqs[i].token_ids.append(token)
                    done = len(outputs[i]) >= max_new_tokens or (
                        stop_at_eos and token == self.config.eos_token_id)
                    if not done:
                        still.append(i)
                running = still
        finally:
            self.release(seqs)
        return outputs
