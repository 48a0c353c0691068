"""Model description read from a checkpoint's config.json (Hugging Face) or params.json (Mistral)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


class ConfigError(ValueError):
    """A config file that does not describe a Mixtral model we can serve."""


@dataclass(frozen=True)
class MixtralConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    experts_per_token: int
    rms_norm_eps: float = 1e-5  # Mixtral 8x7B's value
    rope_theta: float = 1e6  # Mixtral 8x7B's value; Mistral 7B used 1e4
    max_position_embeddings: int = 32768  # Mixtral's 32k context
    sliding_window: int | None = None  # None: full causal attention
    tie_word_embeddings: bool = False  # Mixtral keeps a separate lm_head
    bos_token_id: int = 1  # SentencePiece <s>
    eos_token_id: int = 2  # SentencePiece </s>
    dtype: str = "bfloat16"  # dtype the weights were saved in

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "num_experts", "experts_per_token",
                     "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_attention_heads ({self.num_heads}) must be a multiple of "
                              f"num_key_value_heads ({self.num_kv_heads})")
        if self.experts_per_token > self.num_experts:
            raise ConfigError(f"num_experts_per_tok ({self.experts_per_token}) exceeds "
                              f"num_local_experts ({self.num_experts})")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"sliding_window must be null or positive, got {self.sliding_window}")
        if self.rms_norm_eps <= 0 or self.rope_theta <= 0:
            raise ConfigError("rms_norm_eps and rope_theta must be positive")
        for name in ("bos_token_id", "eos_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ConfigError(f"{name} ({getattr(self, name)}) is outside the vocabulary")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


def _required(raw: dict, key: str, source: Path):
    if key not in raw or raw[key] is None:
        raise ConfigError(f"{source}: missing required field '{key}'")
    return raw[key]


def _read_json(path: str | Path, name: str) -> tuple[Path, dict]:
    """(file path, contents) of `name` given the file or the checkpoint folder holding it."""
    path = Path(path)
    if path.is_dir():
        path = path / name
    try:
        return path, json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None


def from_hf_config(path: str | Path) -> MixtralConfig:
    """Read a Hugging Face config.json (a file or the checkpoint folder holding it)."""
    path, raw = _read_json(path, "config.json")
    model_type = raw.get("model_type")
    if model_type != "mixtral":
        raise ConfigError(f"{path}: field 'model_type' is {model_type!r}; only 'mixtral' is supported")
    hidden = _required(raw, "hidden_size", path)
    heads = _required(raw, "num_attention_heads", path)
    head_dim = raw.get("head_dim")
    if head_dim is None:
        if hidden % heads:
            raise ConfigError(f"{path}: field 'hidden_size' ({hidden}) is not divisible by "
                              f"'num_attention_heads' ({heads}) and no 'head_dim' is given")
        head_dim = hidden // heads
    rope_theta = raw.get("rope_theta")
    if rope_theta is None:
        rope_theta = (raw.get("rope_parameters") or {}).get("rope_theta")
    if rope_theta is None:
        raise ConfigError(f"{path}: missing 'rope_theta' (or 'rope_parameters.rope_theta')")
    rope_type = (raw.get("rope_parameters") or {}).get("rope_type", "default")
    if rope_type != "default":
        raise ConfigError(f"{path}: field 'rope_parameters.rope_type' is {rope_type!r}; only "
                          "'default' RoPE is supported")
    eos = raw.get("eos_token_id", 2)
    if isinstance(eos, list):  # some configs list several; the first is the canonical one
        eos = eos[0]
    dtype = raw.get("dtype") or raw.get("torch_dtype") or "bfloat16"
    return _build(path, dict(
        vocab_size=_required(raw, "vocab_size", path),
        hidden_size=hidden,
        intermediate_size=_required(raw, "intermediate_size", path),
        num_layers=_required(raw, "num_hidden_layers", path),
        num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        num_experts=_required(raw, "num_local_experts", path),
        experts_per_token=_required(raw, "num_experts_per_tok", path),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
        rope_theta=float(rope_theta),
        max_position_embeddings=raw.get("max_position_embeddings", 32768),
        sliding_window=raw.get("sliding_window"),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        bos_token_id=raw.get("bos_token_id", 1),
        eos_token_id=eos,
        dtype=str(dtype),
    ))


def from_mistral_params(path: str | Path) -> MixtralConfig:
    """Read Mistral's own params.json (the consolidated layout of the original Mixtral release)."""
    path, raw = _read_json(path, "params.json")
    moe = raw.get("moe")
    if not moe:
        raise ConfigError(f"{path}: missing field 'moe'; this is not a mixture-of-experts model")
    dim = _required(raw, "dim", path)
    heads = _required(raw, "n_heads", path)
    return _build(path, dict(
        vocab_size=_required(raw, "vocab_size", path),
        hidden_size=dim,
        intermediate_size=_required(raw, "hidden_dim", path),
        num_layers=_required(raw, "n_layers", path),
        num_heads=heads,
        num_kv_heads=raw.get("n_kv_heads") or heads,
        head_dim=raw.get("head_dim") or dim // heads,
        num_experts=_required(moe, "num_experts", path),
        experts_per_token=_required(moe, "num_experts_per_tok", path),
        rms_norm_eps=float(raw.get("norm_eps", 1e-5)),
        rope_theta=float(raw.get("rope_theta", 1e6)),
        max_position_embeddings=raw.get("max_seq_len", 32768),
        sliding_window=raw.get("sliding_window"),
        tie_word_embeddings=False,
    ))


def _build(path: Path, fields: dict) -> MixtralConfig:
    try:
        return MixtralConfig(**fields)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def load_config(model_dir: str | Path) -> MixtralConfig:
    """The config of a checkpoint folder, whichever layout it uses."""
    model_dir = Path(model_dir)
    if (model_dir / "config.json").exists():
        return from_hf_config(model_dir)
    if (model_dir / "params.json").exists():
        return from_mistral_params(model_dir)
    raise ConfigError(f"{model_dir}: neither config.json nor params.json found")
