"""On the real model, through the CLI: a named session whose first prompt starts with
a document the prefix cache holds saves only its own cells (the document's are the
cache's blocks), resumes exactly, and survives `cache clear`."""

from __future__ import annotations

import json

import pytest
from test_prefix_cache_model import document

pytestmark = pytest.mark.slow

# SmolLM2-135M's KV cells at f16: 30 layers x (K + V) x 192 values x 2 bytes.
CELL_BYTES = 30 * 2 * 192 * 2


def _run(kvchat, *args: str, stdin: str | None = None) -> dict:  # noqa: ANN001
    result = kvchat("run", "--json", "--temperature", "0", "-n", "6", "--ctx", "2048", "--threads", "1",
                    *args, stdin=stdin)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_a_session_forked_from_a_cached_document_shares_its_blocks(kvchat) -> None:  # noqa: ANN001
    doc = document(500, seed=21)
    assert _run(kvchat, "How do I reset it?", stdin=doc)["cache"]["prefix_cache_tokens"] == 0
    forked = _run(kvchat, "What does the light mean?", "--session", "doc", stdin=doc)
    restored = forked["cache"]["prefix_cache_tokens"]
    assert restored > 500

    rows = {r["name"]: r for r in json.loads(kvchat("sessions", "list", "--json").stdout)}
    row = rows["doc"]
    # The document's cells are the cache's blocks, named by the session: shared, not its own.
    assert row["shared_bytes"] >= restored * CELL_BYTES
    own_cells = row["n_kv"] - restored
    assert row["bytes"] < (own_cells + 8) * CELL_BYTES + row["n_kv"] * 4 + 64 * 1024
    store = json.loads(kvchat("cache", "stats", "--json").stdout)["kv_store"]
    assert store["bytes"] < (row["n_kv"] + 8) * CELL_BYTES * 2 + 256 * 1024  # each block once

    # The cache cleared: the session keeps its cells and resumes from them, exactly.
    assert kvchat("cache", "clear", "--yes").returncode == 0
    resumed = _run(kvchat, "And the battery?", "--session", "doc")
    cache = resumed["cache"]
    assert cache["reevaluated_tokens"] == 0 and cache["reused_tokens"] >= row["n_kv"] - 1
    # The same conversation evaluated from scratch, without the cache, answers the same.
    plain_first = _run(kvchat, "What does the light mean?", "--session", "plain", "--no-prefix-cache",
                       stdin=doc)
    assert plain_first["text"] == forked["text"]
    plain = _run(kvchat, "And the battery?", "--session", "plain", "--no-prefix-cache")
    assert plain["text"] == resumed["text"]
