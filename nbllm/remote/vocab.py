"""The pieces a server has sent, standing in for a tokenizer nbllm does not have.

A remote model's tokenizer lives on the server. What nbllm sees of it is the
text of each token (and, from servers that report them, the token's id). The
token records, distributions and the stepper work on integer ids, so:

- a piece the server gave an id for keeps that id (``>= 0``);
- a piece without one gets a local key, negative (``-2, -3, ...``) so it can
  never be mistaken for a server id: the same text always gets the same key;
- ``END`` (``-1``) stands for the end of a reply, which servers signal with
  ``finish_reason: stop`` instead of sending the end-of-sequence token.

``RemoteTokenizer`` offers the few tokenizer methods the token loop and the
stepper call (decoding, a streaming detokenizer, the end-of-sequence id).
"""

from __future__ import annotations

import codecs
import threading
from collections.abc import Sequence
from typing import Any

__all__ = ["RemoteTokenizer"]


class RemoteTokenizer:
    """Pieces by id (server ids and local keys) and the reverse."""

    has_chat_template = True
    END = -1

    def __init__(self) -> None:
        self.eos_token_ids: set[int] = {self.END}
        self.pieces: dict[int, str] = {self.END: "<end>"}
        self._by_piece: dict[str, int] = {}
        self._next = -2
        self._bytes: dict[int, bytes] = {}
        self._lock = threading.Lock()

    def key(self, piece: str, server_id: int | None = None, raw: bytes | None = None) -> int:
        """The id of ``piece``: the server's when it gave one, else the piece's local key.

        ``raw``: the token's bytes when the server sent them (what ``decode`` joins).
        """
        with self._lock:
            if server_id is not None and server_id >= 0:
                self.pieces.setdefault(server_id, piece)
                if raw is not None:
                    self._bytes.setdefault(server_id, raw)
                self._by_piece.setdefault(piece, server_id)
                return server_id
            known = self._by_piece.get(piece)
            if known is None:
                known, self._next = self._next, self._next - 1
                self.pieces[known] = piece
                self._by_piece[piece] = known
            return known

    def mark_end(self, token: int) -> None:
        """The server said ``token`` is its end-of-sequence token."""
        with self._lock:
            self.eos_token_ids.add(token)

    @property
    def server_ids(self) -> bool:
        """Whether every piece seen so far came with the server's id."""
        return all(i >= 0 for i in self.pieces if i != self.END)

    def decode(self, ids: Sequence[int], **_: Any) -> str:
        data = b"".join(self.bytes_of(i) for i in ids)
        return data.decode("utf-8", errors="replace")

    def bytes_of(self, token_id: int) -> bytes:
        """The token's bytes (its piece's when the server sent none; nothing for an end token)."""
        if token_id in self.eos_token_ids:
            return b""
        return self._bytes.get(int(token_id)) or self.pieces.get(int(token_id), "").encode()

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Text as one piece (the server tokenizes it when it is sent back)."""
        return [self.key(text)] if text else []

    def convert_ids_to_tokens(self, token_id: int) -> str:
        return self.pieces.get(int(token_id), "")

    @property
    def detokenizer(self) -> PieceDetokenizer:
        return PieceDetokenizer(self)


class PieceDetokenizer:
    """The streaming-detokenizer interface over the tokens' bytes (a character split over tokens waits)."""

    def __init__(self, vocab: RemoteTokenizer):
        self._vocab = vocab
        self._text = ""
        self._read = 0
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    @property
    def text(self) -> str:
        return self._text

    def reset(self) -> None:
        self._text, self._read = "", 0
        self._utf8.reset()

    def add_token(self, token_id: int) -> None:
        self._text += self._utf8.decode(self._vocab.bytes_of(token_id))

    def finalize(self) -> None:
        self._text += self._utf8.decode(b"", final=True)

    @property
    def last_segment(self) -> str:
        segment, self._read = self._text[self._read :], len(self._text)
        return segment
