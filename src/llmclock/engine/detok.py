"""Text out of a token stream: incremental detokenisation and stop strings.

A byte-level BPE token can end in the middle of a UTF-8 character, so a piece of text is released
only once it decodes without a trailing replacement character. Stop strings are matched on the
released text, across token boundaries; text that might be the start of a stop string is held
back until it is known not to be.
"""

from __future__ import annotations


class Detokenizer:
    """Turns one sequence's token ids into text pieces, never half a character."""

    def __init__(self, tokenizer):
        # Byte-level BPE and char tokenizers decode without context, so the prompt is not needed.
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read] is decoded already; ids[read:] is pending

    def push(self, token_id: int, final: bool = False) -> str:
        if self.tok is None:
            return ""
        self.ids.append(token_id)
        return self._release(final)

    def _release(self, final: bool) -> str:
        before = self.tok.decode(self.ids[self.prefix : self.read])
        now = self.tok.decode(self.ids[self.prefix :])
        if len(now) > len(before) and (final or not now.endswith("\ufffd")):
            piece = now[len(before) :]
            self.prefix, self.read = self.read, len(self.ids)
            return piece
        return ""

    def flush(self) -> str:
        """Whatever is still held (at the end of a sequence, replacement characters included)."""
        return self._release(final=True) if self.read < len(self.ids) else ""


class StopMatcher:
    """Releases text until a stop string appears; the stop string and what follows are dropped."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.held = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """(text safe to emit, stopped?)."""
        if not self.stops:
            return piece, False
        text = self.held + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return text[: min(hits)], True
        keep = 0  # longest suffix of text that is a proper prefix of some stop string
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), keep, -1):
                if text.endswith(s[:n]):
                    keep = n
                    break
        self.held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out
