"""Decoding a whole text file as UTF-8, with the first bad byte located (offset and line) for the error message.

Builders (label and caption tables) and downstream readers (tables, ``.txt``, FASTA) report a non-UTF-8
file the same way: by the byte offset and line of its first undecodable byte.
"""
from __future__ import annotations

import codecs


class NotUTF8(ValueError):
    """``data`` is not UTF-8: ``offset`` and ``line`` (1-based) of the first bad byte, the byte, and why."""

    def __init__(self, offset: int, line: int, byte: bytes, reason: str) -> None:
        super().__init__(f"not UTF-8 at byte offset {offset} (line {line}: {byte!r}, {reason})")
        self.offset, self.line, self.byte, self.reason = offset, line, byte, reason


def decode_utf8(data: bytes) -> str:
    """``data`` as text, a leading UTF-8 byte-order mark dropped.

    Raises:
        NotUTF8: locating the first byte that does not decode.
    """
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as exn:
        offset = bom + exn.start
        raise NotUTF8(offset, data.count(b"\n", 0, offset) + 1, data[offset:offset + 1], exn.reason) from None
