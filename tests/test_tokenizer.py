"""Mixtral's tokenizer against transformers' and SentencePiece's own, and streaming decode."""

from __future__ import annotations

import pytest

from expertmesh.core.tokenizer import IncrementalDetokenizer, load_tokenizer, mixtral_sentencepiece_path

TEXTS = {
    "english": "The quick brown fox jumps over the lazy dog. It's 3:45pm -- isn't it?",
    "french": "Où est la bibliothèque ? Je voudrais   trois livres, s'il vous plaît. Ça coûte 12,50 €.",
    "italian": "Perché non è così? L'università è già chiusa, però domani sarà aperta.",
    "german": "Ich möchte Äpfel, Öl und Brötchen für 3,50 € kaufen. Straße, Größe, Übermaß.",
    "spanish": "¿Dónde está el baño? ¡Olé! El niño comió piñata en año nuevo.",
    "code": "def fib(n: int) -> int:\n    if n < 2:\n\treturn n  # tab\n    return fib(n-1) + fib(n-2)\n\n"
            "print({'a': [1, 2, 3]}, end=\"\\n\")  ",
    "edge": "  leading spaces, 日本語, emoji 🤗🚀, and a\u00a0non-breaking space",
}


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    """Mixtral's tokenizer converted afresh in this run (an empty cache folder), not a cached copy."""
    cache = tmp_path_factory.mktemp("fresh_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EXPERTMESH_CACHE", str(cache))
        tokenizer = load_tokenizer(tmp_path_factory.mktemp("no_tokenizer_json"))  # falls back to Mixtral's
    assert (cache / "mixtral-tokenizer-v1.json").exists()  # the conversion ran here
    return tokenizer


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    """transformers' tokenizer for a Mixtral checkpoint folder in hub layout."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="module")
def mistral_reference():
    """Mistral's own tokenizer (mistral-common, SentencePiece underneath): the ground truth."""
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    return MistralTokenizer.v1().instruct_tokenizer.tokenizer


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_encoding_matches_transformers_and_mistral(ours, reference, mistral_reference, name):
    import sentencepiece

    text = TEXTS[name]
    ids = ours.encode(text)
    assert ids[0] == 1  # BOS
    assert ids == reference(text).input_ids
    assert ids == mistral_reference.encode(text, bos=True, eos=False)
    spm = sentencepiece.SentencePieceProcessor(model_file=str(mixtral_sentencepiece_path()))
    assert ids[1:] == spm.encode(text)
    assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True) == spm.decode(ids[1:])
    assert ours.vocab_size == 32000


def test_runs_of_spaces_follow_sentencepiece(ours):
    """transformers 5 building a tokenizer straight from tokenizer.model splits runs of spaces
    differently (for "a  b" it gives [264, 259, 28726]); Mixtral was trained on SentencePiece's."""
    assert ours.encode("a  b") == [1, 264, 28705, 287]


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_streaming_decode_equals_full_decode(ours, name):
    ids = ours.encode(TEXTS[name])
    prompt, rest = ids[:3], ids[3:]
    stream = IncrementalDetokenizer(ours, prompt)
    deltas = [stream.add([t]) for t in rest]
    for delta in deltas:
        delta.encode("utf-8")  # each delta is valid text on its own
        assert "\ufffd" not in delta
    full = ours.decode(ids)
    assert "".join(deltas) == full[len(ours.decode(prompt)):]


def test_streaming_from_empty_prompt_keeps_spaces(ours):
    ids = ours.encode("Hello world, ça va? 🤗 ok", add_bos=False)
    stream = IncrementalDetokenizer(ours)
    assert "".join(stream.add([t]) for t in ids) == ours.decode(ids)


def test_checkpoint_tokenizer_json_is_used(tiny_checkpoint):
    tokenizer = load_tokenizer(tiny_checkpoint)
    assert (tiny_checkpoint / "tokenizer.json").exists()
    assert tokenizer.decode(tokenizer.encode("Mixtral parle français.")) == "Mixtral parle français."
