"""A small terminal screen for tests: enough of a VT100 to replay what kvchat's live
area writes, with the line re-wrapping (reflow) on resize that most terminals do.

It knows printable text, CR, LF, BS, erase in line/display, cursor moves and
ignores styles and private modes. Rows that filled up and wrapped are remembered
as one logical line, so `resize` re-wraps them as VTE, iTerm2 or kitty do.
"""

from __future__ import annotations

import re

_CSI = re.compile(r"\x1b\[([0-9;?]*)([ -/]*)([@-~])")
_OTHER_ESC = re.compile(r"\x1b([()][0-9A-B]|[=>78NOMc])")


class Screen:
    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self.rows: list[list[str]] = [[]]
        self.wrapped: list[bool] = [False]  # row i continues on row i + 1
        self.row = self.col = 0

    # -- output ----------------------------------------------------------------------

    def _ensure(self, row: int) -> None:
        while len(self.rows) <= row:
            self.rows.append([])
            self.wrapped.append(False)

    @property
    def top(self) -> int:
        """The first row on screen (rows above it are scrollback, out of the cursor's reach)."""
        return max(0, len(self.rows) - self.height)

    def _put(self, ch: str) -> None:
        if self.col >= self.width:
            self.wrapped[self.row] = True
            self.row += 1
            self.col = 0
            self._ensure(self.row)
        line = self.rows[self.row]
        while len(line) < self.col:
            line.append(" ")
        if self.col < len(line):
            line[self.col] = ch
        else:
            line.append(ch)
        self.col += 1

    def feed(self, data: str) -> None:
        i = 0
        while i < len(data):
            ch = data[i]
            if ch == "\x1b":
                match = _CSI.match(data, i)
                if match:
                    self._csi(match.group(1), match.group(3))
                    i = match.end()
                    continue
                match = _OTHER_ESC.match(data, i)
                i = match.end() if match else i + 1
                continue
            if ch == "\r":
                self.col = 0
            elif ch == "\n":
                self.row += 1
                self._ensure(self.row)
            elif ch == "\b":
                self.col = max(0, self.col - 1)
            elif ch >= " ":
                self._put(ch)
            i += 1

    def _csi(self, params: str, final: str) -> None:
        if params.startswith("?"):
            return
        numbers = [int(p) if p else 0 for p in params.split(";")] if params else []
        n = numbers[0] if numbers else 0
        if final == "A":
            self.row = max(self.top, self.row - max(n, 1))
        elif final == "B":
            self.row += max(n, 1)
            self._ensure(self.row)
        elif final == "C":
            self.col = min(self.width - 1, self.col + max(n, 1))
        elif final == "D":
            self.col = max(0, self.col - max(n, 1))
        elif final == "G":
            self.col = max(n, 1) - 1
        elif final == "K":
            line = self.rows[self.row]
            if n == 0:
                del line[self.col:]
            elif n == 1:
                line[: self.col] = [" "] * min(self.col, len(line))
            else:
                line.clear()
            if n in (0, 2):
                self.wrapped[self.row] = False
        elif final == "J" and n == 0:
            del self.rows[self.row][self.col:]
            del self.rows[self.row + 1:]
            del self.wrapped[self.row + 1:]
            self.wrapped[self.row] = False

    # -- resize ------------------------------------------------------------------------

    def resize(self, width: int, height: int) -> None:
        """Re-wrap every logical line at the new width; the cursor keeps its place in the text."""
        logical: list[str] = []
        cursor_line = cursor_offset = 0
        current = ""
        for i, cells in enumerate(self.rows):
            if i == self.row:
                cursor_line, cursor_offset = len(logical), len(current) + self.col
            current += "".join(cells)
            if not self.wrapped[i]:
                logical.append(current)
                current = ""
        if current:
            logical.append(current)
        self.width, self.height = width, height
        self.rows, self.wrapped = [], []
        for index, text in enumerate(logical):
            text = text.rstrip(" ") if index != cursor_line else text
            chunks = [text[k : k + width] for k in range(0, len(text), width)] or [""]
            if index == cursor_line:
                self.row = len(self.rows) + min(cursor_offset // width, len(chunks) - 1)
                self.col = cursor_offset - (self.row - len(self.rows)) * width
            for k, chunk in enumerate(chunks):
                self.rows.append(list(chunk))
                self.wrapped.append(k < len(chunks) - 1)
        self._ensure(self.row)

    # -- reading --------------------------------------------------------------------------

    def lines(self) -> list[str]:
        """Every row, scrollback included, right-trimmed."""
        return ["".join(cells).rstrip() for cells in self.rows]
