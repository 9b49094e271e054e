"""What every request model shares (server/protocol.py, server/structured.py): the models'
config (unknown fields ignored, known fields strict) and Text, a str that must be Unicode."""
from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, ConfigDict

REQUEST = ConfigDict(extra="ignore", strict=True)


def _utf8(value: str) -> str:
    # JSON may carry "\ud800" (a lone surrogate): valid JSON, but no Unicode text, so the
    # tokenizer cannot take it. Say so here (a 400 naming the field) instead of failing there.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"not valid Unicode text: a lone surrogate {value[e.start]!r} at "
                         f"character {e.start}") from None
    return value


Text = Annotated[str, AfterValidator(_utf8)]
