"""Structured outputs: grammars compiled from a request's constraint (JSON schema, regex,
choice, EBNF), one matcher per request that the engine advances with each sampled token,
and the per-step token bitmask the worker applies to the logits (raylm.structured.base)."""
from raylm.structured.base import (BaseGrammar, BaseGrammarBackend, apply_bitmask,
                                   create_grammar_backend, register_grammar_backend)

__all__ = ["BaseGrammar", "BaseGrammarBackend", "apply_bitmask", "create_grammar_backend",
           "register_grammar_backend"]
