"""The application layer: what every command does with a model and a conversation.

It sits between the CLI, the REPL and the server (parse, render, speak HTTP) and
the core (settings, planner, engines, conversations), one module per concern:

- `load`: every check before llama.cpp is touched, the load, the chat template;
- `speculation`: the speculative mode and draft model, the speculator;
- `backends`: what runs the model (here, llama-server, an OpenAI-compatible
  server) and the facts each gives about itself;
- `lifecycle`: open, resume, save, save as, close a conversation (`Chat`);
- `report`: the typed record of a turn, the one definition of `--json`;
- `estimates`: what a model will cost, from its header alone.

It never prints: warnings go to the `warn` callback the caller passes. Names are
re-exported here lazily, so that `kvchat estimate` imports only `estimates` (and
what it needs), never the conversation machinery.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the names below, for the type checker (`X as X`: re-exported)
    from kvchat.app.backends import Backend as Backend
    from kvchat.app.backends import LlamaServerBackend as LlamaServerBackend
    from kvchat.app.backends import LocalBackend as LocalBackend
    from kvchat.app.backends import LocalFacts as LocalFacts
    from kvchat.app.backends import MemoryFigures as MemoryFigures
    from kvchat.app.backends import MessageServerBackend as MessageServerBackend
    from kvchat.app.backends import ServerFacts as ServerFacts
    from kvchat.app.estimates import Estimate as Estimate
    from kvchat.app.estimates import draft_estimate as draft_estimate
    from kvchat.app.estimates import estimate as estimate
    from kvchat.app.estimates import exact_buffers as exact_buffers
    from kvchat.app.estimates import read_model_spec as read_model_spec
    from kvchat.app.lifecycle import Chat as Chat
    from kvchat.app.lifecycle import open_conversation as open_conversation
    from kvchat.app.lifecycle import open_prefix_cache as open_prefix_cache
    from kvchat.app.lifecycle import open_server as open_server
    from kvchat.app.lifecycle import switch_conversation as switch_conversation
    from kvchat.app.load import LoadRequest as LoadRequest
    from kvchat.app.load import Warn as Warn
    from kvchat.app.load import bench_engine_factory as bench_engine_factory
    from kvchat.app.load import chat_template_for as chat_template_for
    from kvchat.app.load import expected_context as expected_context
    from kvchat.app.load import gpu_offload_supported as gpu_offload_supported
    from kvchat.app.load import load_engine as load_engine
    from kvchat.app.load import resolve_load as resolve_load
    from kvchat.app.load import resolve_schema as resolve_schema
    from kvchat.app.load import sampling_of as sampling_of
    from kvchat.app.report import TurnReport as TurnReport
    from kvchat.app.report import rebuilt_cache_counts as rebuilt_cache_counts
    from kvchat.app.report import turn_report as turn_report
    from kvchat.app.speculation import SpeculationRequest as SpeculationRequest
    from kvchat.app.speculation import resolve_speculation as resolve_speculation
    from kvchat.app.speculation import speculation_counters as speculation_counters
    from kvchat.app.speculation import speculative_mode as speculative_mode
    from kvchat.app.speculation import start_speculation as start_speculation

_EXPORTS = {
    "backends": ("Backend", "LlamaServerBackend", "LocalBackend", "LocalFacts", "MemoryFigures",
                 "MessageServerBackend", "ServerFacts"),
    "estimates": ("Estimate", "draft_estimate", "estimate", "exact_buffers", "read_model_spec"),
    "lifecycle": ("Chat", "open_conversation", "open_prefix_cache", "open_server", "switch_conversation"),
    "load": ("LoadRequest", "Warn", "bench_engine_factory", "chat_template_for", "expected_context",
             "gpu_offload_supported", "load_engine", "resolve_load", "resolve_schema", "sampling_of"),
    "report": ("TurnReport", "rebuilt_cache_counts", "turn_report"),
    "speculation": ("SpeculationRequest", "resolve_speculation", "speculation_counters", "speculative_mode",
                    "start_speculation"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'kvchat.app' has no attribute {name!r}")
    return getattr(importlib.import_module(f"kvchat.app.{module}"), name)
