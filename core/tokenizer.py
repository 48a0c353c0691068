"""The model's tokenizer: a checkpoint's tokenizer.json, or Mixtral 8x7B's own SentencePiece model.

Mixtral's tokenizer is a 32000-piece SentencePiece BPE model with byte fallback. `mistral-common`
ships it as `tokenizer.model.v1`; we convert it once to the Hugging Face `tokenizer.json` form (the
same "legacy" form the Mixtral hub repository carries) and serve it with `tokenizers`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
from tokenizers.models import BPE

from expertmesh.core.heap import release_free_heap

SPIECE_SPACE = "\u2581"  # SentencePiece's visible space, "▁"


# Mistral's SentencePiece tokenizers shipped inside the mistral-common package: v1 is Mixtral 8x7B's
# (32000 pieces); v3 is Mixtral 8x22B Instruct's (32768: v1's and control tokens, tools among them).
SHIPPED = {"v1": "tokenizer.model.v1", "v3": "mistral_instruct_tokenizer_240323.model.v3"}


def mixtral_sentencepiece_path(version: str = "v1") -> Path:
    """A Mistral tokenizer model (SHIPPED) as shipped inside the mistral-common package."""
    import mistral_common

    path = Path(mistral_common.__file__).parent / "data" / SHIPPED[version]
    if not path.exists():
        raise FileNotFoundError(f"{path}: mistral-common does not ship {SHIPPED[version]}")
    return path


def cache_dir() -> Path:
    root = os.environ.get("EXPERTMESH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "expertmesh")
    return Path(root)


def convert_sentencepiece(model_path: str | Path) -> Tokenizer:
    """Build a `tokenizers` BPE tokenizer equal to a SentencePiece BPE model (Llama/Mistral style)."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(model_path).read_bytes())
    if proto.trainer_spec.model_type != 2:  # 2 == BPE
        raise ValueError(f"{model_path}: not a SentencePiece BPE model")
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
    # A merge (left, right) exists for every split of a piece into two pieces of the vocabulary;
    # SentencePiece applies the merge that yields the best-scoring piece first.
    merges = []
    for piece, score, _ in pieces:
        splits = [(piece[:i], piece[i:]) for i in range(1, len(piece))
                  if piece[:i] in vocab and piece[i:] in vocab]
        splits.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        merges.extend((left, right, score) for left, right in splits)
    merges.sort(key=lambda m: (-m[2], -len(m[0]), -len(m[1])))  # stable: keeps id order on ties
    unk = pieces[proto.trainer_spec.unk_id][0]
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=[(a, b) for a, b, _ in merges], unk_token=unk,
                              fuse_unk=True, byte_fallback=True))
    # Control pieces (<unk>, <s>, </s>) are special tokens, never produced from text.
    tokenizer.add_special_tokens([AddedToken(p, normalized=False, special=True)
                                  for p, _, kind in pieces if kind in (2, 3)])
    tokenizer.normalizer = normalizers.Sequence([
        normalizers.Prepend(SPIECE_SPACE), normalizers.Replace(" ", SPIECE_SPACE)])
    tokenizer.decoder = decoders.Sequence([
        decoders.Replace(SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
        decoders.Strip(" ", 1, 0)])
    bos = pieces[proto.trainer_spec.bos_id][0]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
        special_tokens=[(bos, proto.trainer_spec.bos_id)])
    return tokenizer


def mixtral_tokenizer_json(version: str = "v1") -> Path:
    """Path of the converted tokenizer.json (SHIPPED version), converting once into the cache."""
    target = cache_dir() / f"mixtral-tokenizer-{version}.json"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        convert_sentencepiece(mixtral_sentencepiece_path(version)).save(str(tmp))
        os.replace(tmp, target)  # atomic: concurrent processes never read half a file
    return target


class TextTokenizer:
    """Encode with BOS, decode without special tokens, and know the ids that end generation."""

    def __init__(self, tokenizer: Tokenizer, bos_token_id: int, eos_token_id: int):
        self.backend = tokenizer
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return [self.bos_token_id, *ids] if add_bos else ids

    def encode_rendered(self, text: str) -> list[int]:
        """Ids of template-rendered text, whose <s> and </s> are the special tokens themselves."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, token_ids: list[int]) -> str:
        return self.backend.decode(list(token_ids), skip_special_tokens=True)


def load_tokenizer(model_dir: str | Path, bos_token_id: int = 1, eos_token_id: int = 2) -> TextTokenizer:
    """The checkpoint's tokenizer.json when it has one, Mixtral's own tokenizer otherwise."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.exists():
        path = mixtral_tokenizer_json()
    tokenizer = TextTokenizer(Tokenizer.from_file(str(path)), bos_token_id, eos_token_id)
    release_free_heap()  # the JSON parse's transients: 19 of the 31 MB it left resident (Mixtral's)
    return tokenizer


def write_tokenizer_files(model_dir: str | Path, version: str = "v1") -> None:
    """Write the tokenizer.json and tokenizer_config.json of a SHIPPED tokenizer into a checkpoint
    folder; from v3 on also Mistral's own file (tokenizer.model.v3), which carries the tool format
    (core/tool_format.py), as Mistral's repositories do."""
    model_dir = Path(model_dir)
    (model_dir / "tokenizer.json").write_bytes(mixtral_tokenizer_json(version).read_bytes())
    if version != "v1":
        (model_dir / f"tokenizer.model.{version}").write_bytes(mixtral_sentencepiece_path(version).read_bytes())
    (model_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False, "legacy": True,
        "model_max_length": 32768,
    }, indent=2))


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas for streaming.

    Each delta is valid UTF-8, and the deltas concatenate to decode(all tokens): a byte-fallback
    sequence that has not completed a character yet is held back, and the SentencePiece leading space
    comes out right because text is always decoded with some tokens of context before it.
    """

    def __init__(self, tokenizer: TextTokenizer, prompt_ids: list[int] | None = None):
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_ids or [])
        # ids[prefix:read] was already emitted; ids[prefix:] is decoded together for context.
        self.prefix_offset = max(len(self.ids) - 5, 0)
        self.read_offset = len(self.ids)

    def add(self, new_ids: list[int]) -> str:
        self.ids.extend(new_ids)
        decode = self.tokenizer.decode
        prefix_text = decode(self.ids[self.prefix_offset:self.read_offset])
        full_text = decode(self.ids[self.prefix_offset:])
        if full_text.endswith("\ufffd") or len(full_text) <= len(prefix_text):
            return ""  # an incomplete UTF-8 sequence (or nothing new): wait for more tokens
        delta = full_text[len(prefix_text):]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        return delta

    def flush(self) -> str:
        """The text still held back (an unfinished character), at the end of the stream."""
        decode = self.tokenizer.decode
        rest = decode(self.ids[self.prefix_offset:])[len(decode(self.ids[self.prefix_offset:self.read_offset])):]
        self.read_offset = len(self.ids)
        return rest
