"""Where the turns of a rendered conversation begin, in characters and in tokens.

A conversation is tokenized in pieces cut at the start of each user turn, so that
a turn's first token is known exactly (dropping the oldest turn then removes
exactly its tokens) and the tokenizer never merges across a turn boundary.
"""

from __future__ import annotations

import codecs
import os
from dataclasses import dataclass

from kvchat.chat_template import ChatTemplate, Message, preamble_length
from kvchat.engine_api import ChatEngine


@dataclass
class TurnMark:
    """Where a user turn starts: message index, token index, character index; and
    where its reply starts (token and character index; -1 until the prompt is in)."""

    message: int
    token: int
    char: int
    reply_token: int = -1
    reply_char: int = -1


class TurnSplitter:
    """Turn boundaries for one engine's tokenizer and one chat template."""

    def __init__(self, engine: ChatEngine, template: ChatTemplate) -> None:
        self.engine = engine
        self.template = template
        self.preamble = preamble_length(template)

    def turn_offset(self, messages: list[Message], i: int, text: str) -> int | None:
        """Character offset in `text` where user message `i` starts, if known."""
        if i == 0:
            return min(self.preamble, len(text))
        prefix = self.template.render(messages[:i], add_generation_prompt=False)
        return len(prefix) if text.startswith(prefix) else None

    def turn_marks(self, messages: list[Message], text: str) -> list[tuple[int, int]]:
        """(message index, character offset) of every user turn found in `text`."""
        marks = []
        for i, message in enumerate(messages):
            if message["role"] == "user":
                offset = self.turn_offset(messages, i, text)
                if offset is not None:
                    marks.append((i, offset))
        return marks

    def tokenize_at(self, text: str, cuts: list[int], *, at_start: bool) -> tuple[list[int], list[int]]:
        """Tokenize `text` in pieces split at `cuts`; return tokens and where each cut landed.

        Text `at_start` of the history gets the model's BOS token unless the
        template already wrote it.
        """
        tokens: list[int] = []
        landed: list[int] = []
        start = 0
        for cut in [*cuts, len(text)]:
            piece = text[start:cut]
            if piece:
                add_bos = False
                if at_start and not tokens:
                    bos_text = self.engine.token_text(self.engine.bos_token)
                    add_bos = self.engine.add_bos and not (bos_text and piece.startswith(bos_text))
                tokens.extend(self.engine.tokenize(piece, add_special=add_bos))
                if add_bos and tokens[:1] == [self.engine.bos_token]:
                    # The BOS token the model adds is the preamble's, not the first
                    # turn's: a cut at the very start lands after it, so dropping that
                    # turn keeps it.
                    landed = [max(at, 1) for at in landed]
            landed.append(len(tokens))
            start = max(start, cut)
        return tokens, landed[:-1]

    def prefix_cuts(self, tokens: list[int], mark: TurnMark | None, rendered: str, text: str,
                     shared_chars: int | None) -> list[int]:
        """Token positions where the prefix cache cuts this prompt: the end of what comes
        before the user turn (the system prompt), and the end of the shared start of the
        message (`shared_chars`), one token early in case the tokenizer merges across it."""
        if mark is None:
            return []
        cuts = [mark.token]
        content_at = rendered.find(text, mark.char)
        if shared_chars and content_at >= 0:
            want = len(rendered[mark.char : content_at + shared_chars].encode("utf-8"))
            have = 0
            for i in range(mark.token, len(tokens)):
                have += len(self.engine.token_piece(tokens[i], special=True))
                if have > want:
                    cuts.append(i - 1)
                    break
        return cuts

    def resync(self, tokens: list[int], kv_text: str, turns: list[TurnMark], text: str,
               messages: list[Message]) -> tuple[int, list[int], list[TurnMark]]:
        """The history made to stand for `text`, where the cached text `kv_text` (the
        text of `tokens`) is not its prefix (a template that rewrote earlier turns):
        the history's tokens, as they were generated, for the longest start of `text`
        they stand for, then the rest tokenized at turn boundaries. Returns how many
        tokens were kept, the new tokens and the turn marks."""
        common = len(os.path.commonprefix([kv_text, text]))
        ends = self._token_ends(tokens, kv_text)
        keep = max(j for j, (end, clean) in enumerate(ends) if clean and end <= common)
        marks = self.turn_marks(messages, text)
        kept_at: list[int] = []
        for _i, c in marks:
            if c >= ends[keep][0]:
                break
            # A turn that starts in the kept text starts on one of its token boundaries
            # (the last, after a BOS the model added); else keep less.
            boundaries = [j for j in range(keep + 1) if ends[j] == (c, True)]
            if not boundaries:
                keep = max(j for j in range(keep + 1) if ends[j][1] and ends[j][0] <= c)
                break
            kept_at.append(boundaries[-1])
        start = ends[keep][0]
        rest_marks = marks[len(kept_at):]
        rest, landed = self.tokenize_at(text[start:], [c - start for _, c in rest_marks], at_start=keep == 0)
        replies = {m.message: m for m in turns}
        new_turns = []
        for (i, c), at in zip(marks, kept_at + [keep + at for at in landed], strict=True):
            old = replies.get(i)
            # A reply start stays valid only where the text before it is unchanged.
            reply = (old.reply_token, old.reply_char) if old and 0 <= old.reply_token <= keep else (-1, -1)
            new_turns.append(TurnMark(i, at, c, *reply))
        return keep, tokens[:keep] + rest, new_turns

    def _token_ends(self, tokens: list[int], kv_text: str) -> list[tuple[int, bool]]:
        """For each j in 0..len(tokens): the characters of `kv_text` that tokens[:j]
        stand for, and whether j is a character boundary (no partial UTF-8 pending).
        A BOS token the model added stands for no text (the cached text lacks it)."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        bos_text = self.engine.token_text(self.engine.bos_token)
        model_bos = tokens[:1] == [self.engine.bos_token] and not (bos_text and kv_text.startswith(bos_text))
        ends, n = [(0, True)], 0
        for j, token in enumerate(tokens):
            if not (j == 0 and model_bos):
                n += len(decoder.decode(self.engine.token_piece(token, special=True)))
            ends.append((n, decoder.getstate()[0] == b""))
        return ends
