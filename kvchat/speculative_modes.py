"""The `--speculative` modes, on their own so that the settings table can name them
without importing the drafting code (kvchat.speculative), which would be a cycle."""

from __future__ import annotations

MODES = ("auto", "ngram", "draft", "off")
