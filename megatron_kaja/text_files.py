"""Reading users' text files (data sets, prompts, seeds, evaluation sets) as UTF-8, with an
error that names the file, the line and the encoding when a file is not UTF-8.

Kept free of heavy imports: the evaluation and synthetic-data readers use it too.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator
from pathlib import Path

# UTF-32 first: its little-endian mark begins with UTF-16's.
_WIDE_BOMS = (
    (codecs.BOM_UTF32_LE, "UTF-32 LE"),
    (codecs.BOM_UTF32_BE, "UTF-32 BE"),
    (codecs.BOM_UTF16_LE, "UTF-16 LE"),
    (codecs.BOM_UTF16_BE, "UTF-16 BE"),
)
# Encodings that Japanese text files are often saved in, tried to name a non-UTF-8 file's.
_LIKELY_ENCODINGS = ("cp932", "euc_jp")


def _guess_encoding(raw: bytes) -> str:
    if b"\x00" in raw:
        return "; it looks like UTF-16 or UTF-32"
    for encoding in _LIKELY_ENCODINGS:
        try:
            raw.decode(encoding)
        except UnicodeDecodeError:
            continue
        return f"; it decodes as {encoding} ({'Shift_JIS' if encoding == 'cp932' else 'EUC-JP'})"
    return ""


def iter_text_lines(
    path: str | Path, error: type[ValueError] = ValueError
) -> Iterator[tuple[int, str]]:
    """`(line number, line)` of a UTF-8 text file, a UTF-8 byte-order mark skipped.

    Any other encoding raises `error` (a ValueError) naming the file, the line, the byte
    and, where it can tell, the encoding the file is in (UTF-16 / UTF-32 by their byte-order
    mark, Shift_JIS or EUC-JP by trying them on the line), instead of a JSON error or a
    `UnicodeDecodeError` with a byte offset into the whole file."""
    path = Path(path)
    with path.open("rb") as f:
        head = f.read(4)
        for bom, name in _WIDE_BOMS:
            if head.startswith(bom):
                raise error(
                    f"{path}:1: the file is {name} (it starts with a {name} byte-order mark); "
                    "save it as UTF-8"
                )
        f.seek(0)
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]  # RFC 8259 lets a JSON reader skip it
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise error(
                    f"{path}:{lineno}: not UTF-8 (byte 0x{raw[exc.start]:02x} at byte "
                    f"{exc.start + 1} of the line){_guess_encoding(raw)}; save the file as UTF-8"
                ) from None
