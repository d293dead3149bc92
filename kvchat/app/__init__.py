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

It never prints: warnings go to the `warn` callback the caller passes.
"""

from kvchat.app.backends import Backend, LocalFacts, MemoryFigures, ServerFacts
from kvchat.app.lifecycle import Chat, open_conversation, switch_conversation
from kvchat.app.load import LoadRequest, Warn, chat_template_for
from kvchat.app.report import TurnReport, turn_report

__all__ = [
    "Backend", "Chat", "LoadRequest", "LocalFacts", "MemoryFigures", "ServerFacts", "TurnReport", "Warn",
    "chat_template_for", "open_conversation", "switch_conversation", "turn_report",
]
