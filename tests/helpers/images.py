"""Image files made up for tests."""
from __future__ import annotations

import struct
import zlib


def bomb_png(path, w: int, h: int) -> str:
    """A PNG header announcing w x h pixels (PIL refuses it on open, before reading any pixel data)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) +
                     chunk(b"IEND", b""))
    return str(path)
