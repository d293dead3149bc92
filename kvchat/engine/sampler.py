"""llama.cpp's native sampler chain for kvchat's sampling settings."""

from __future__ import annotations

from typing import Any

import llama_cpp.llama_cpp as llama

from kvchat.engine_api import SamplingSettings
from kvchat.errors import UsageError

# The tokens llama.cpp's penalties look back over (its CLI's and llama-server's default).
PENALTY_TOKENS = 64


def penalties_of(chain: Any, sampling: SamplingSettings) -> Any:
    """The penalties sampler of a chain sampler_chain built (None without penalties):
    what Engine.start_reply primes with the conversation's last tokens."""
    return llama.llama_sampler_chain_get(chain, 0) if sampling.penalised else None


def schema_grammar(schema: str) -> str:
    """A JSON Schema (JSON text) as a GBNF grammar, by llama.cpp's own converter (as
    llama-server's json_schema); a schema it cannot express is a usage error."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        return str(json_schema_to_gbnf(schema))
    except Exception as exc:  # the converter asserts, and raises ValueError, KeyError...
        raise UsageError(f"--schema: llama.cpp cannot express this schema as a grammar: {exc}",
                         hint="use the JSON Schema subset llama.cpp supports (grammars/README.md)") from None


def sampler_chain(sampling: SamplingSettings, vocab: Any, grammar: str | None = None) -> tuple[Any, bool]:
    """The chain (a ctypes handle; the caller frees it) and whether it is plain greedy.
    `grammar` (GBNF) constrains what may be sampled; a chain with one is never plain.

    A chain of greedy alone keeps no state, and its choice is the first index of the
    largest logit, which is numpy's argmax: ~30 us where llama_sampler_sample first
    builds a candidate array of the whole vocabulary (0.5 ms for Gemma 3's 262k
    tokens, once per token and per verified draft position); Engine.sample takes the
    argmax itself then.
    """
    chain = llama.llama_sampler_chain_init(llama.llama_sampler_chain_default_params())
    seed = llama.LLAMA_DEFAULT_SEED if sampling.seed is None else sampling.seed & 0xFFFFFFFF
    if sampling.penalised:
        # First in the chain (penalties_of finds it there): llama.cpp's penalties sampler
        # over the last 64 tokens (its CLI's and llama-server's default). Repeat divides a
        # repeated token's logit; frequency and presence (OpenAI's) subtract per occurrence
        # and once. This llama.cpp's signature starts with the vocabulary's size.
        llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_penalties(
            llama.llama_vocab_n_tokens(vocab), PENALTY_TOKENS, sampling.repeat_penalty,
            sampling.frequency_penalty, sampling.presence_penalty))
    if grammar is not None:
        # Before the samplers that choose: only tokens the grammar allows reach them.
        constrain = llama.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
        if not constrain:
            llama.llama_sampler_free(chain)
            raise UsageError("--schema: llama.cpp cannot build a grammar from this schema",
                             hint="simplify the schema (see llama.cpp's grammars/README.md)")
        llama.llama_sampler_chain_add(chain, constrain)
    if sampling.temperature <= 0:
        llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_greedy())
    else:
        if sampling.top_k > 0:
            llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_top_k(sampling.top_k))
        llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_top_p(sampling.top_p, 1))
        if sampling.min_p > 0:
            llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_min_p(sampling.min_p, 1))
        llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_temp(sampling.temperature))
        llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_dist(seed))
    return chain, sampling.temperature <= 0 and not sampling.penalised and grammar is None
