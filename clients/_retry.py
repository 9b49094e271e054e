"""When to retry and how long to wait: exponential backoff with jitter, or the server's
Retry-After, never longer than a cap."""
from __future__ import annotations

import datetime
import email.utils
import math
import time

import httpx

RETRY_STATUSES = frozenset({429, 503})
# the request never reached the server: safe to send again, even a generation
RETRY_TRANSPORT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


def backoff_delay(attempt: int, base: float, cap: float, retry_after: float | None = None,
                  rand: float = 1.0) -> float:
    """Seconds to wait before retry `attempt` (0 = the first retry).

    base * 2**attempt, of which the upper half is jittered by `rand` in [0, 1) so that
    clients turned away together do not come back together; at least the server's
    Retry-After when it sent one; never more than `cap`."""
    step = min(base * 2.0 ** attempt, cap)
    delay = step / 2 + step / 2 * rand
    if retry_after is not None:
        delay = max(delay, retry_after)
    return max(0.0, min(delay, cap))


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """A Retry-After header in seconds: delta-seconds or an HTTP date; None if absent or
    unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # "-0000": UTC, source unknown
            when = when.replace(tzinfo=datetime.timezone.utc)
        seconds = when.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)
