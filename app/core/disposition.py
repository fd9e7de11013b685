"""``Content-Disposition`` values for downloads whose names come from users (case ids, label names).

HTTP header values are Latin-1 on the wire, so a name like ``Leber-ß-肝`` cannot be put in
``filename="..."`` as is (the server could not even encode the header: a 500). RFC 6266 with RFC 5987:
an ASCII fallback ``filename="..."`` for old clients plus ``filename*=UTF-8''<percent-encoded>`` that
every current browser and curl (``-J``) prefer.
"""

from __future__ import annotations

import re
import unicodedata
from urllib.parse import quote

_UNSAFE = re.compile(r'[^A-Za-z0-9!#$&+.^_`|~ ()\[\]{}@,;=-]')  # quotes, backslashes, controls, non-ASCII


def ascii_filename(filename: str) -> str:
    """The name with accents stripped and every other unsafe character replaced by ``_``."""
    # ß and 肝 have no ASCII decomposition: they keep their place as "_"
    folded = "".join(
        c if c.isascii() else (unicodedata.normalize("NFKD", c).encode("ascii", "ignore").decode() or "_")
        for c in filename
    )
    return _UNSAFE.sub("_", folded).strip() or "download"


def content_disposition(filename: str, disposition: str = "attachment") -> str:
    """``attachment; filename="..."`` (plus ``filename*=UTF-8''...`` when the name is not plain ASCII)."""
    fallback = ascii_filename(filename)
    if fallback == filename:
        return f'{disposition}; filename="{filename}"'
    return f"{disposition}; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"
