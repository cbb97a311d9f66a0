"""Dates and times a user types (``--since``, ``--until``): one reading for
every command (``sigil monitor``, ``sigil report``).

An ISO date or date-time; without an offset it is local time (``TZ``), and
``z``/``Z`` is UTC. A moment at the edge of :class:`datetime`'s range (year 1,
year 9999) is read as UTC where local time would leave the range, and a bare
date as the end of a range (the whole day) past 9999-12-31 is clamped to the
last moment :class:`datetime` holds: never an error for a date that is one.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

__all__ = ["parse_moment"]

#: the last moment datetime holds, as UTC
_LAST = datetime.max.replace(tzinfo=UTC)


def parse_moment(text: str, *, end: bool = False) -> datetime | None:
    """``text`` as an aware datetime; None when it is no ISO date or date-time.

    A bare date as ``end`` (``--until``) covers that whole day: the moment
    returned is the next day's start (exclusive)."""
    text = text.strip()
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        return None
    bare_date = len(text) <= 10 and "T" not in text and " " not in text
    if end and bare_date:
        try:
            moment += timedelta(days=1)
        except OverflowError:  # the day after 9999-12-31
            return _LAST
    if moment.tzinfo is None:
        try:
            moment = moment.astimezone()  # local time, as a user types it (DST included)
        except (ValueError, OverflowError):  # the edge of datetime's range
            return moment.replace(tzinfo=UTC)  # hours from the edge: all or nothing
    return moment
