"""Speculative decoding against plain decoding, side by side in one run.

For each model (SmolLM2-135M, Gemma 3 270M) and each task:

* rewrite: a generated Python file of about 200 lines piped in with an instruction
  whose answer repeats it ("repeat this file exactly, adding a comment above each
  function"): the case speculative decoding is for. (At 300 lines, about 2,200
  prompt tokens, SmolLM2-135M no longer copies: it writes an introduction and one
  function of its own, so there is nothing to draft; `--lines 300` shows it);
* free: a question answered in free text, where drafts rarely match: the cost of
  trying (goal: >= 0.97x plain).

it decodes the same prompt at temperature 0 with kvchat plain, n-gram and (SmolLM2
only, as its own draft model: mechanics, not speed) draft-model modes, plus an
"oracle" that drafts the plain reply itself through the n-gram policy (every draft
kept: the ceiling verification allows on this machine), and prints
decode tok/s, the ratio over plain, the acceptance rate and whether the tokens are
identical to plain decoding. Goals (issue 14): >= 2x plain on rewrite, >= 0.97x on
free text, tokens identical.

Anchor: llama-server with --spec-type ngram-simple / ngram-map-k (and without),
fed the same prompt tokens, when `python benchmarks/llama_tools.py --check` says the
tools are built (skipped otherwise).

Usage: python benchmarks/bench_speculative.py [--threads 2] [--max-tokens 400]
           [--lines 200] [--repeats 3] [--models smollm2,gemma3] [--no-server]
Smoke: python benchmarks/bench_speculative.py --lines 20 --max-tokens 24 --repeats 1 --no-server
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import llama_tools  # noqa: E402
import model_files  # noqa: E402

from kvchat.app import chat_template_for  # noqa: E402
from kvchat.cache_types import parse_cache_type  # noqa: E402
from kvchat.engine import Engine, EngineSettings  # noqa: E402
from kvchat.engine_api import ChatEngine, SamplingSettings  # noqa: E402
from kvchat.session import Session  # noqa: E402
from kvchat.speculative import (  # noqa: E402
    DraftPolicy,
    ModelDrafter,
    NgramDrafter,
    Speculator,
    policy_for,
    vocab_mismatch,
)
from kvchat.speculative_engine import SpeculativeEngine  # noqa: E402

GREEDY = SamplingSettings(temperature=0, seed=1)
F16 = parse_cache_type("f16")
_NAMES = ["total", "count", "price", "width", "height", "score", "speed", "weight", "level", "index"]
_VERBS = ["compute", "update", "check", "scale", "merge", "clamp", "format", "parse", "round", "split"]


def rewrite_source(n_lines: int) -> str:
    """A plain Python file of about `n_lines` lines: small functions, 6 lines each."""
    lines: list[str] = []
    i = 0
    while len(lines) < n_lines:
        name, verb = _NAMES[i % len(_NAMES)], _VERBS[(i // len(_NAMES)) % len(_VERBS)]
        lines += [
            f"def {verb}_{name}_{i}(value, factor):",
            f"    result = value * factor + {i}",
            f"    if result > {100 + i}:",
            f"        result = {100 + i}",
            "    return result",
            "",
        ]
        i += 1
    return "\n".join(lines[:n_lines]) + "\n"


def prompts(n_lines: int) -> dict[str, str]:
    return {
        "rewrite": rewrite_source(n_lines) + "\nRepeat the Python file above exactly, line by line, "
        "adding a one-line comment above each function.",
        "free": "Write a short essay about why people enjoy walking in the mountains.",
    }


@dataclass
class Result:
    tok_s: float
    tokens: list[int]
    drafted: int
    accepted: int
    prompt_tokens: list[int]


def run_kvchat(engine: Engine, prompt: str, speculator: Speculator | None, max_tokens: int) -> Result:
    engine.kv_clear()
    # Not closed here: the caller owns the engine and the speculator (and its draft engine).
    chat: ChatEngine = engine if speculator is None else SpeculativeEngine(engine, speculator)
    session = Session(chat, chat_template_for(engine), GREEDY, max_tokens)
    sent = session.send(prompt)
    tokens = [e.token for e in sent]
    turn = sent.stats
    return Result(turn.decode_tok_s, tokens, turn.drafted_tokens, turn.accepted_tokens,
                  session.tokens[: len(session.tokens) - len(tokens)])


class OracleDrafter:
    """Drafts the reply plain decoding gave (known from its run): every draft is kept,
    so its speed is the ceiling of verification on this machine, for this policy and
    text; it shows how much of the gap to that ceiling is the drafts' fault."""

    name = "oracle"

    def __init__(self, sequence: list[int]) -> None:
        self.sequence = sequence

    def sync(self, context: Sequence[int]) -> None:
        pass

    def draft(self, context: Sequence[int], n_max: int) -> list[int]:
        n = len(context)
        if list(context[-8:]) != self.sequence[max(0, n - 8) : n]:
            return []
        return self.sequence[n : n + n_max]

    def feedback(self, paid: float) -> None:
        pass

    def close(self) -> None:
        pass


def oracle_speculator(engine: Engine, prompt: str, plain: Result, max_tokens: int) -> Speculator:
    """The n-gram policy fed the reply itself: first plain decoding's; where batched
    rounding tips a near-tie (SmolLM2) the oracle's own reply differs from there, and
    the next pass drafts that one, until a pass keeps every draft (at most 4)."""
    reply = plain.tokens
    for _ in range(4):
        spec = Speculator(OracleDrafter(plain.prompt_tokens + reply), policy_for("ngram"))
        got = run_kvchat(engine, prompt, spec, max_tokens)
        if got.tokens == reply:
            break
        reply = got.tokens
    return Speculator(OracleDrafter(plain.prompt_tokens + reply), policy_for("ngram"))


def same_tokens(plain: list[int], other: list[int]) -> str:
    """'yes', or where the texts part (batched rounding at a near-tie; see README)."""
    if plain == other:
        return "yes"
    at = next((i for i, (a, b) in enumerate(zip(plain, other, strict=False)) if a != b),
              min(len(plain), len(other)))
    return f"no: part at token {at}"



def run_server(model: Path, spec_type: str | None, prompt_tokens: list[int], max_tokens: int,
               threads: int, n_ctx: int, repeats: int) -> tuple[float, int, int] | None:
    """llama-server's decode tok/s (and drafted/accepted) on the same prompt tokens.

    Each repeat starts a fresh server: ngram-map-k keeps its map across requests, so a
    second identical request drafts the first one's reply (281 of 281 kept, where the
    first kept 281 of 449) and would measure a memory kvchat's bench does not give."""
    tools = llama_tools.built()
    if tools is None:
        return None
    args = ["-m", str(model), "-t", str(threads), "-c", str(n_ctx), "-np", "1", "-fa", "off", "--no-webui"]
    if spec_type:
        args += ["--spec-type", spec_type]
    speeds = []
    drafted = accepted = 0
    for _ in range(repeats):
        with llama_tools.LlamaServer(tools["llama-server"], *args) as server:
            body = json.dumps({"prompt": prompt_tokens, "n_predict": max_tokens, "temperature": 0,
                               "cache_prompt": False}).encode()
            headers = {"Content-Type": "application/json"}
            req = urllib.request.Request(server.url + "/completion", body, headers)
            with urllib.request.urlopen(req, timeout=600) as r:
                timings = json.loads(r.read())["timings"]
        speeds.append(timings["predicted_per_second"])
        drafted, accepted = timings.get("draft_n", 0), timings.get("draft_n_accepted", 0)
    return max(speeds), drafted, accepted


def bench_model(label: str, path: Path, args: argparse.Namespace) -> None:
    settings = EngineSettings(n_ctx=args.ctx, type_k=F16, type_v=F16, n_threads=args.threads)
    with Engine(path, settings) as engine:
        engine.set_sampling(GREEDY)
        draft = None
        if label == "smollm2" and not args.no_draft:
            draft = Engine(path, settings)
            assert vocab_mismatch(engine, draft) is None
            draft.set_sampling(GREEDY)
        try:
            for task, prompt in prompts(args.lines).items():
                modes: dict[str, Speculator | None] = {"plain": None, "ngram": Speculator(NgramDrafter())}
                if draft is not None:
                    modes["draft"] = Speculator(ModelDrafter(draft, engine.n_vocab), DraftPolicy())
                first = run_kvchat(engine, prompt, None, args.max_tokens)  # also the warm-up
                results: dict[str, Result] = {"plain": first}
                modes["oracle"] = oracle_speculator(engine, prompt, first, args.max_tokens)
                for _ in range(args.repeats):  # interleaved, so that machine noise hits all modes
                    for mode, spec in modes.items():
                        r = run_kvchat(engine, prompt, spec, args.max_tokens)
                        if mode not in results or r.tok_s > results[mode].tok_s:
                            results[mode] = r
                plain = results["plain"]
                print(f"\n{label} · {task} · prompt {len(plain.prompt_tokens)} tok · "
                      f"{len(plain.tokens)} tok generated · best of {args.repeats}")
                print(f"  {'mode':<22}{'decode tok/s':>13}{'x plain':>9}{'drafted':>9}{'accepted':>9}"
                      f"{'rate':>7}  same tokens")
                for mode, r in results.items():
                    rate = f"{r.accepted / r.drafted:.0%}" if r.drafted else "-"
                    print(f"  {'kvchat ' + mode:<22}{r.tok_s:>13.1f}{r.tok_s / plain.tok_s:>9.2f}"
                          f"{r.drafted:>9}{r.accepted:>9}{rate:>7}  {same_tokens(plain.tokens, r.tokens)}")
                if args.no_server:
                    continue
                if llama_tools.built() is None:
                    print("  llama-server: not built (python benchmarks/llama_tools.py), anchor skipped")
                    continue
                server_plain = None
                for spec_type in (None, "ngram-simple", "ngram-map-k"):
                    got = run_server(path, spec_type, plain.prompt_tokens, len(plain.tokens), args.threads,
                                     args.ctx, args.repeats)
                    if got is None:
                        continue
                    tok_s, drafted, accepted = got
                    server_plain = server_plain or tok_s
                    rate = f"{accepted / drafted:.0%}" if drafted else "-"
                    name = "llama-server " + (spec_type or "plain")
                    print(f"  {name:<22}{tok_s:>13.1f}{tok_s / server_plain:>9.2f}{drafted:>9}{accepted:>9}"
                          f"{rate:>7}  (x its own plain)")
        finally:
            if draft is not None:
                draft.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=400)
    parser.add_argument("--lines", type=int, default=200, help="lines of the file to rewrite")
    parser.add_argument("--ctx", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", default="smollm2,gemma3")
    parser.add_argument("--no-server", action="store_true", help="skip the llama-server anchor")
    parser.add_argument("--no-draft", action="store_true", help="skip the draft-model mode")
    args = parser.parse_args()
    found = {"smollm2": model_files.smollm2_path, "gemma3": model_files.gemma3_path}
    for label in args.models.split(","):
        path = found[label]()
        if path is None:
            print(f"{label}: model not installed, skipped")
            continue
        bench_model(label, path, args)


if __name__ == "__main__":
    main()
