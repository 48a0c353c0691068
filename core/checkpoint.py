"""Read Mixtral checkpoints by ownership: only the tensors a caller owns are read, memory-mapped.

Layouts:
  hub          config.json + model-0000N-of-0000M.safetensors + model.safetensors.index.json,
               or config.json + model.safetensors (Hugging Face)
  consolidated params.json + consolidated*.safetensors (Mistral's original release)

Names inside this project are the hub's. Consolidated keys are mapped on the way in, and their
q/k projections are permuted from Mistral's interleaved RoPE layout to the hub's half-split one.
Opening a checkpoint reads only the safetensors headers and accounts for every key: a missing
tensor, an unknown key or a wrong shape is an error naming the key and the file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from expertmesh.core.config import MixtralConfig, from_hf_config, from_mistral_params

INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint whose files do not match its config."""


def expert_keys(layer: int, expert: int) -> tuple[str, str, str]:
    """Hub keys of one expert's (w1, w2, w3): gate projection, down projection, up projection."""
    base = f"model.layers.{layer}.block_sparse_moe.experts.{expert}"
    return f"{base}.w1.weight", f"{base}.w2.weight", f"{base}.w3.weight"


def expected_shapes(config: MixtralConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a hub-layout checkpoint of this config holds, with its shape."""
    d, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, d)
    for layer in range(config.num_layers):
        p = f"model.layers.{layer}"
        shapes |= {
            f"{p}.input_layernorm.weight": (d,),
            f"{p}.post_attention_layernorm.weight": (d,),
            f"{p}.self_attn.q_proj.weight": (config.q_size, d),
            f"{p}.self_attn.k_proj.weight": (config.kv_size, d),
            f"{p}.self_attn.v_proj.weight": (config.kv_size, d),
            f"{p}.self_attn.o_proj.weight": (d, config.q_size),
            f"{p}.block_sparse_moe.gate.weight": (config.num_experts, d),
        }
        for expert in range(config.num_experts):
            w1, w2, w3 = expert_keys(layer, expert)
            shapes |= {w1: (i, d), w2: (d, i), w3: (i, d)}
    return shapes


# (Mistral consolidated name, hub name); {l} layer, {e} expert, {w} w1/w2/w3.
_NAME_PAIRS = [
    ("tok_embeddings.weight", "model.embed_tokens.weight"),
    ("norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
    ("layers.{l}.attention_norm.weight", "model.layers.{l}.input_layernorm.weight"),
    ("layers.{l}.ffn_norm.weight", "model.layers.{l}.post_attention_layernorm.weight"),
    ("layers.{l}.attention.wq.weight", "model.layers.{l}.self_attn.q_proj.weight"),
    ("layers.{l}.attention.wk.weight", "model.layers.{l}.self_attn.k_proj.weight"),
    ("layers.{l}.attention.wv.weight", "model.layers.{l}.self_attn.v_proj.weight"),
    ("layers.{l}.attention.wo.weight", "model.layers.{l}.self_attn.o_proj.weight"),
    ("layers.{l}.feed_forward.gate.weight", "model.layers.{l}.block_sparse_moe.gate.weight"),
    ("layers.{l}.feed_forward.experts.{e}.{w}.weight",
     "model.layers.{l}.block_sparse_moe.experts.{e}.{w}.weight"),
]
_FIELDS = {"l": r"(?P<l>\d+)", "e": r"(?P<e>\d+)", "w": r"(?P<w>w[123])"}


def _template_regex(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(r"\{", "{").replace(r"\}", "}").format(**_FIELDS))


def _rename(name: str, source: int) -> str | None:
    for pair in _NAME_PAIRS:
        match = _template_regex(pair[source]).fullmatch(name)
        if match:
            return pair[1 - source].format(**match.groupdict())
    return None


def consolidated_to_hub_name(name: str) -> str | None:
    return _rename(name, 0)


def hub_to_consolidated_name(name: str) -> str | None:
    return _rename(name, 1)


def interleaved_to_half_split(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Permute q/k rows from Mistral's interleaved RoPE pairs to the hub's half-split pairs."""
    out_dim, in_dim = w.shape  # (n_heads * head_dim, hidden)
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def half_split_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    out_dim, in_dim = w.shape
    return w.view(n_heads, 2, out_dim // n_heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


class Checkpoint:
    """An opened checkpoint folder: its config and where each tensor lives (headers only)."""

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise CheckpointError(f"{self.model_dir}: not a checkpoint folder")
        if (self.model_dir / "config.json").exists():
            self.layout = "hub"
            self.config = from_hf_config(self.model_dir)
            files = self._hub_files()
        elif (self.model_dir / "params.json").exists():
            self.layout = "consolidated"
            self.config = from_mistral_params(self.model_dir)
            files = sorted(self.model_dir.glob("consolidated*.safetensors"))
            if not files:
                raise CheckpointError(f"{self.model_dir}: params.json but no consolidated*.safetensors")
        else:
            raise CheckpointError(f"{self.model_dir}: neither config.json nor params.json found")
        # hub name -> (file, name inside the file)
        self.locations: dict[str, tuple[Path, str]] = {}
        self._check(files)

    def _hub_files(self) -> list[Path]:
        index_path = self.model_dir / INDEX_FILE
        if not index_path.exists():
            single = self.model_dir / "model.safetensors"
            if not single.exists():
                raise CheckpointError(f"{self.model_dir}: no {INDEX_FILE} and no model.safetensors")
            return [single]
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index_path}: not a safetensors index ({exc})") from None
        self._index = weight_map
        files = []
        for name in sorted(set(weight_map.values())):
            path = self.model_dir / name
            if not path.exists():
                raise CheckpointError(f"{index_path}: names shard {name}, which does not exist")
            files.append(path)
        return files

    def _check(self, files: list[Path]) -> None:
        expected = expected_shapes(self.config)
        for path in files:
            try:
                with safe_open(path, framework="pt") as f:
                    entries = [(key, tuple(f.get_slice(key).get_shape())) for key in f.keys()]
            except Exception as exc:  # safetensors raises its own error types for bad files
                raise CheckpointError(f"{path}: unreadable safetensors file ({exc})") from None
            for key, shape in entries:
                name = key if self.layout == "hub" else consolidated_to_hub_name(key)
                if name not in expected:
                    raise CheckpointError(f"{path}: unexpected tensor '{key}' for this config")
                if shape != expected[name]:
                    raise CheckpointError(f"{path}: tensor '{key}' has shape {list(shape)}, "
                                          f"expected {list(expected[name])}")
                if name in self.locations:
                    raise CheckpointError(f"{path}: tensor '{key}' also in {self.locations[name][0]}")
                self.locations[name] = (path, key)
        index = getattr(self, "_index", None)
        for name in expected:
            if name not in self.locations:
                where = f" (the index puts it in {index[name]})" if index and name in index else ""
                raise CheckpointError(f"{self.model_dir}: tensor '{name}' is missing{where}")
        if index:
            for name, shard in index.items():
                if self.locations.get(name, (None,))[0] != self.model_dir / shard:
                    raise CheckpointError(f"{self.model_dir / INDEX_FILE}: '{name}' is listed in "
                                          f"{shard} but that file does not hold it")

    def read(self, names: list[str], dtype: torch.dtype | None = None, mapped: bool = False
             ) -> dict[str, torch.Tensor]:
        """Read the named tensors (hub names), each file memory-mapped and opened once; each tensor is
        copied out of the mapping (nothing stays mapped after the load). mapped: a tensor already in
        `dtype` stays a view of the mapping, for a caller that lays it out at once and drops it (one
        copy instead of two: new memory is most of a load's cost)."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            if name not in self.locations:
                raise KeyError(f"{self.model_dir}: no tensor '{name}'")
            by_file.setdefault(self.locations[name][0], []).append(name)
        out = {}
        for path, file_names in by_file.items():
            with safe_open(path, framework="pt") as f:
                for name in file_names:
                    tensor = f.get_tensor(self.locations[name][1])
                    if self.layout == "consolidated" and name.endswith(("q_proj.weight", "k_proj.weight")):
                        heads = self.config.num_heads if "q_proj" in name else self.config.num_kv_heads
                        tensor = interleaved_to_half_split(tensor, heads)
                    # a copy of its own, even in the file's dtype: a tensor still backed by the mapping
                    # keeps the whole file mapped, and every page the load touched resident with it
                    if dtype not in (None, tensor.dtype):
                        tensor = tensor.to(dtype)
                    elif not mapped:
                        tensor = tensor.clone()
                    out[name] = tensor
        return out

    def dense_names(self) -> list[str]:
        """Everything but the experts: what a router owns."""
        return [n for n in self.locations if ".block_sparse_moe.experts." not in n]

    def read_dense(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        return self.read(self.dense_names(), dtype)

    def read_experts(self, pairs: list[tuple[int, int]], dtype: torch.dtype | None = None, mapped: bool = False
                     ) -> dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Weights (w1, w2, w3) of the given (layer, expert) pairs, and nothing else (mapped: as `read`)."""
        for layer, expert in pairs:
            if not (0 <= layer < self.config.num_layers and 0 <= expert < self.config.num_experts):
                raise KeyError(f"no expert ({layer}, {expert}) in this checkpoint")
        tensors = self.read([k for pair in pairs for k in expert_keys(*pair)], dtype, mapped)
        return {pair: tuple(tensors[k] for k in expert_keys(*pair)) for pair in pairs}
