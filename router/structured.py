"""Structured output: a grammar a request's answer must follow (any JSON, a JSON schema, a regular
expression, or one of a list of strings), enforced while sampling.

Before each token of a constrained request, its logits row is masked to the tokens the grammar
allows next (xgrammar, the engine vLLM and SGLang use; an optional dependency:
`pip install "expertmesh[structured]"`). Only constrained rows are masked, so unconstrained requests
in the same batch pay nothing (bench/structured.py measures it). When the grammar is complete the
only token it allows is EOS, and the request ends with it. Grammars compile once per distinct spec
(xgrammar's cache), off the serving loop: on the front door's request-preparation threads.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass

import torch

from expertmesh.core.tokenizer import TextTokenizer
from expertmesh.router.requests import InvalidRequest

KINDS = ("json", "json_schema", "regex", "choice")
MAX_SPEC_CHARS = 64 << 10  # a schema, regex or choice list: compiling it must stay cheap
# JSON schema keywords xgrammar (0.2) accepts and does not enforce (measured: a value they rule out
# passes), or enforces wrongly (contains refuses what it allows): a schema using one is refused by
# name, never half-honoured. (maxLength, pattern, minimum, multipleOf, format, maxItems, minProperties,
# propertyNames, enum, const, anyOf and one-entry allOf are enforced.)
UNENFORCED = ("uniqueItems", "not", "if", "then", "else", "contains", "minContains", "maxContains",
              "dependentRequired", "dependentSchemas", "dependencies", "unevaluatedProperties", "unevaluatedItems")
# where a schema holds subschemas: one, a list of them, or a map of names to them
_ONE = ("additionalProperties", "items", "propertyNames", "additionalItems", "contains", "not", "if", "then", "else")
_LIST = ("anyOf", "oneOf", "allOf", "prefixItems", "items")
_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def unenforced_keyword(schema, path: str = "#") -> str | None:
    """The first keyword of a JSON schema (walking only subschema positions, never property names or
    enum values) that the grammar engine would not enforce, as "path: keyword"; None when none."""
    if not isinstance(schema, dict):
        return None
    for keyword in UNENFORCED:
        if keyword in schema:
            return f"{path}: {keyword}"
    if isinstance(schema.get("allOf"), list) and len(schema["allOf"]) > 1:
        return f"{path}: allOf with several schemas"
    children = [(f"{path}/{k}", schema[k]) for k in _ONE if isinstance(schema.get(k), dict)]
    children += [(f"{path}/{k}/{i}", s) for k in _LIST if isinstance(schema.get(k), list)
                 for i, s in enumerate(schema[k])]
    children += [(f"{path}/{k}/{name}", s) for k in _MAP if isinstance(schema.get(k), dict)
                 for name, s in schema[k].items()]
    return next((found for child_path, child in children if (found := unenforced_keyword(child, child_path))), None)


@dataclass(frozen=True)
class StructureSpec:
    """kind: "json" (any JSON object), "json_schema" (value: the schema as JSON text), "regex"
    (value: the expression), "choice" (value: a JSON list of the allowed strings)."""
    kind: str
    value: str = ""
    field: str = "response_format"  # the request field it came from, for errors


class Constraint:
    """One request's grammar state: masks its logits, follows its tokens."""

    def __init__(self, compiled, vocab_size: int):
        import xgrammar as xgr

        self._xgr = xgr
        self.matcher = xgr.GrammarMatcher(compiled)
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        self.vocab_size = vocab_size

    def mask(self, scores: torch.Tensor) -> None:
        """scores (V,) fp32, in place: every token the grammar does not allow next -> -inf."""
        self.matcher.fill_next_token_bitmask(self.bitmask)
        self._xgr.apply_token_bitmask_inplace(scores[None], self.bitmask, vocab_size=self.vocab_size)

    def accept(self, token: int) -> None:
        if not self.matcher.accept_token(token):
            raise RuntimeError(f"the grammar refused token {token}, which its own mask allowed")

    @property
    def complete(self) -> bool:
        return self.matcher.is_terminated()


class Grammars:
    """Compiles StructureSpecs for one tokenizer (once each, cached); thread-safe."""

    def __init__(self, tokenizer: TextTokenizer, vocab_size: int, eos_token_id: int):
        self.tokenizer, self.vocab_size, self.eos_token_id = tokenizer, vocab_size, eos_token_id
        self._compiler = None
        self._lock = threading.Lock()

    def _get_compiler(self, field: str):
        with self._lock:
            if self._compiler is None:
                try:
                    import xgrammar as xgr
                    from transformers import PreTrainedTokenizerFast
                except ImportError:
                    raise InvalidRequest("structured output needs xgrammar, which this server does not have "
                                         '(pip install "expertmesh[structured]")', field) from None
                hf = PreTrainedTokenizerFast(tokenizer_object=self.tokenizer.backend)
                info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=self.vocab_size,
                                                          stop_token_ids=[self.eos_token_id])
                self._compiler = xgr.GrammarCompiler(info, max_threads=2)
            return self._compiler

    def compile(self, spec: StructureSpec) -> "CompiledSpec":
        """-> a compiled grammar for constraint(); InvalidRequest (naming spec.field) when it is bad."""
        return CompiledSpec(spec, self._compile(spec))

    def _compile(self, spec: StructureSpec):
        if spec.kind not in KINDS:
            raise InvalidRequest(f"{spec.field}: unknown kind {spec.kind!r}; one of {', '.join(KINDS)}", spec.field)
        if len(spec.value) > MAX_SPEC_CHARS:
            raise InvalidRequest(f"{spec.field} has {len(spec.value)} characters; at most {MAX_SPEC_CHARS}", spec.field)
        compiler = self._get_compiler(spec.field)
        try:
            if spec.kind == "json":  # OpenAI's json_object: an object, any keys (not any JSON value)
                return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
            if spec.kind == "json_schema":
                try:
                    found = unenforced_keyword(json.loads(spec.value))
                except ValueError:
                    found = None  # not JSON: the compiler says so
                if found is not None:
                    raise InvalidRequest(f"{spec.field}: the schema uses {found}, which structured output cannot "
                                         "enforce", spec.field)
                return compiler.compile_json_schema(spec.value, any_whitespace=False)
            if spec.kind == "regex":
                return compiler.compile_regex(spec.value)
            choices = json.loads(spec.value)
            if not (isinstance(choices, list) and choices and all(isinstance(c, str) and c for c in choices)):
                raise InvalidRequest(f"{spec.field} must be a non-empty list of non-empty strings", spec.field)
            return compiler.compile_grammar("root ::= " + " | ".join(json.dumps(c) for c in choices))
        except InvalidRequest:
            raise
        except Exception as exc:  # noqa: BLE001 - xgrammar's errors for a bad schema, regex or grammar
            raise InvalidRequest(f"{spec.field} could not be compiled: {str(exc)[:300]}", spec.field) from None

    def constraint(self, compiled: "CompiledSpec") -> Constraint:
        """The grammar's state for one request; a grammar that came from another process (which
        carries only its spec) is compiled here, for this process's tokenizer."""
        grammar = compiled.grammar if compiled.grammar is not None else self._compile(compiled.spec)
        return Constraint(grammar, self.vocab_size)


@dataclass
class CompiledSpec:
    """A spec and its compiled grammar. Pickled (to a router in another process), it carries the
    spec alone: xgrammar's compiled grammars do not pickle, and the router compiles its own."""
    spec: StructureSpec
    grammar: object = None

    def __getstate__(self) -> dict:
        return {"spec": self.spec, "grammar": None}
