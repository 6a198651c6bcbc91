"""Reading text people hand us (YAML settings, review CSVs, caption sidecars): UTF-8, with or without a BOM.

Notepad and Excel write UTF-8 with a byte-order mark and CRLF line ends; both are accepted. Anything that
is not UTF-8 (Excel's "CSV" in a Windows Western-European code page, say) is a `UserError` naming the file,
the first bad byte and how to save it as UTF-8, never a UnicodeDecodeError traceback.
"""

from __future__ import annotations

import os
from pathlib import Path

from lorapipe.errors import UserError


def decode_user_text(data: bytes, source: str | os.PathLike) -> str:
    """`data` as text: UTF-8 (a leading BOM dropped), CRLF and CR line ends turned into LF.

    Raises:
        UserError: the bytes are not UTF-8; the message names `source` and the offset of the first bad byte.
    """
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        bad = data[err.start:err.start + 1].hex()
        raise UserError(
            f"{source}: not UTF-8 text (byte 0x{bad} at offset {err.start}); save it as UTF-8 "
            "(Excel: Save As → 'CSV UTF-8'; Notepad: Encoding → UTF-8)"
        ) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_user_text(path: str | os.PathLike, what: str = "file") -> str:
    """The text of a file a person wrote, decoded as by `decode_user_text`.

    Raises:
        UserError: the path is missing, is a folder, cannot be read, or is not UTF-8 (one line each).
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(f"{path}: is a folder, not a {what}")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: no such {what}") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read this {what} ({err.strerror or err})") from None
    return decode_user_text(data, path)


def printable(text: str) -> str:
    """`text` as it can be written as UTF-8 (manifests, logs, the UI), with nothing dropped.

    A file name whose bytes are not UTF-8 (a Latin-1 `café.jpg` from an old Windows copy, in a folder or a
    tar) reaches Python with each bad byte as a lone surrogate (PEP 383), which no UTF-8 writer accepts;
    each becomes `\\xNN`, the byte it stands for: `caf\\xe9.jpg`. Other text is returned as it is.
    """
    if not any("\ud800" <= c <= "\udfff" for c in text):
        return text
    return "".join(f"\\x{ord(c) - 0xDC00:02x}" if "\udc80" <= c <= "\udcff"
                   else f"\\u{ord(c):04x}" if "\ud800" <= c <= "\udfff" else c for c in text)
