"""Opening hours: when an account's phones are meant to be answered.

A `Calendar` tells, for any instant, whether an account is open. `parse_hours` builds one from the
`hours:` block of the configuration:

    hours:
      timezone: Europe/Bratislava
      open:
        mon-fri: "08:00-12:00, 12:30-17:00"
        sat: "09:00-12:00"
      holidays:
        country: SK
        closed: ["2026-12-31"]
        open: {"2026-12-20": "10:00-14:00"}

Each local date has one rule, decided in this order:
1. a `holidays.open` date opens with its own ranges, whether it is a holiday or not;
2. otherwise a public holiday of the country (from the `holidays` package) or a `holidays.closed`
   date is closed all day;
3. otherwise the weekday's ranges apply; a weekday that is not listed is closed.

Ranges are wall-clock times in the calendar's time zone. A range whose end is not after its start,
such as 22:00-06:00, runs past midnight: it opens at 22:00 and closes at 06:00 the next morning, and
all of it belongs to the day it starts on. So a Sunday night runs to 06:00 even when Monday is a
holiday, and a holiday evening does not open even when the next day is a working day.

Across a daylight-saving change a range keeps its wall-clock ends, so a range that spans the changed
hour is an hour shorter (spring) or longer (autumn). A wall time the clock skips (02:30 on the
spring change) means the moment the clock jumps past it (03:00 summer time); a wall time the clock
shows twice (02:30 on the autumn change) means its first occurrence.
"""

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from functools import lru_cache
from itertools import pairwise
from types import MappingProxyType
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from holidays import country_holidays, list_supported_countries

# Imported as a module, not `from exporter.config import ConfigError`, so that config.py can
# import this module in turn.
from exporter import config

Period = Literal["open", "closed"]

MINUTES_PER_DAY = 24 * 60
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
# How far next_change looks ahead: past any run of holidays and any yearly pattern.
HORIZON_DAYS = 2 * 366
ONE_DAY = timedelta(days=1)

RANGE = re.compile(r"\s*([0-9]{1,2}):([0-9]{2})\s*[-\u2013]\s*([0-9]{1,2}):([0-9]{2})\s*")
ISO_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
RANGE_EXAMPLE = '"08:00-12:00, 12:30-17:00"'


@dataclass(frozen=True, order=True)
class OpenRange:
    """One opening, from `start` to `end`, in minutes after the local midnight of its day.

    `end` is above 1440 for a range that closes after midnight: 22:00-06:00 is 1320 to 1800.
    """

    start: int
    end: int

    def __str__(self) -> str:
        return f"{_clock(self.start)}-{_clock(self.end)}"


Ranges = tuple[OpenRange, ...]
FULL_DAY: Ranges = (OpenRange(0, MINUTES_PER_DAY),)


@dataclass(frozen=True)
class Week:
    """The ranges of each weekday, Monday first; an empty tuple is a closed day."""

    days: tuple[Ranges, ...]

    def __post_init__(self) -> None:
        if len(self.days) != len(WEEKDAYS):
            raise ValueError(f"a week has 7 days, not {len(self.days)}")


@dataclass(frozen=True)
class Holidays:
    """The dates that do not follow the weekly ranges.

    `country` (and `subdivision`) name the public holidays of the `holidays` package, `closed`
    adds closed dates, and `open` gives dates that open with their own ranges instead of the
    day's usual rule, holiday or not.
    """

    country: str | None = None
    subdivision: str | None = None
    closed: frozenset[date] = frozenset()
    # Left out of the hash (a mapping has none); equality still compares it.
    open: Mapping[date, Ranges] = field(default_factory=lambda: MappingProxyType({}), hash=False)

    def is_public_holiday(self, day: date) -> bool:
        if self.country is None:
            return False
        return day in _public_holidays(self.country, self.subdivision, day.year)

    def is_day_off(self, day: date) -> bool:
        """A public holiday or a configured closed date (an exceptional opening still opens)."""
        return day in self.closed or self.is_public_holiday(day)


@lru_cache(maxsize=64)
def _public_holidays(country: str, subdivision: str | None, year: int) -> frozenset[date]:
    # A frozen set per year: the package's own object fills itself lazily, which threads
    # sharing it would race on.
    return frozenset(country_holidays(country, subdiv=subdivision, years=year).keys())


@dataclass(frozen=True)
class Calendar:
    """When an account is open: weekly ranges in a time zone, with holidays.

    All instants are Unix times (seconds, float). The methods are pure and safe to call from
    any thread.
    """

    timezone: ZoneInfo
    week: Week
    holidays: Holidays = Holidays()

    @property
    def always_open(self) -> bool:
        """Open every second: every weekday 00:00-24:00 and no date that differs."""
        return (
            all(ranges == FULL_DAY for ranges in self.week.days)
            and self.holidays.country is None
            and not self.holidays.closed
            and not self.holidays.open
        )

    def ranges_on(self, day: date) -> Ranges:
        """The ranges that start on the local date `day`, in order (empty when closed)."""
        if day in self.holidays.open:
            return self.holidays.open[day]
        if self.holidays.is_day_off(day):
            return ()
        return self.week.days[day.weekday()]

    def is_open(self, at: float) -> bool:
        """Whether the account is open at `at`; a range includes its start, not its end."""
        if self.always_open:
            return True
        day = self._local_day(at)
        return any(start <= at < end for start, end in self._openings(day - ONE_DAY, day))

    def period(self, at: float) -> Period:
        """`open` or `closed`, as the `period` label of a call that started at `at`."""
        return "open" if self.is_open(at) else "closed"

    def open_seconds(self, start: float, end: float) -> float:
        """The seconds within [start, end) during which the account was open; 0 if end <= start.

        A caller's wait is measured in these: missed at Friday 17:55 with 18:00 closing and
        called back Monday 08:10 with 08:00 opening, the caller waited 900 open seconds.
        """
        if end <= start:
            return 0.0
        if self.always_open:
            return end - start
        openings = self._openings(self._local_day(start) - ONE_DAY, self._local_day(end))
        return sum(max(0.0, min(close, end) - max(opening, start)) for opening, close in openings)

    def next_change(self, at: float) -> float | None:
        """The first instant after `at` at which is_open gives another answer.

        None when there is none within HORIZON_DAYS days (about two years) nor up to the last
        exceptional opening date: the account is always open, or never.
        """
        if self.always_open:
            return None
        first = self._local_day(at) - ONE_DAY
        last = max(first + timedelta(days=HORIZON_DAYS), max(self.holidays.open, default=first))
        # An opening still running at this instant may go on: the days after `last` are unread.
        unknown_after = self._instant(last + ONE_DAY, 0)
        for start, end in self._openings(first, last):
            if at < start:
                return start
            if at < end:
                return end if end < unknown_after else None
        return None

    def _openings(self, first: date, last: date) -> Iterator[tuple[float, float]]:
        """The ranges of the days first..last as Unix-time intervals, merged and in order.

        Merged, so 20:00-24:00 followed by 00:00-08:00 the next day is one interval. Ranges of
        days before `first` that run into it are left out: callers start a day early.
        """
        pending: tuple[float, float] | None = None
        day = first
        while day <= last:
            for opening in sorted(self.ranges_on(day)):
                start, end = self._instant(day, opening.start), self._instant(day, opening.end)
                if end <= start:
                    continue  # wholly inside the hour the clock skips
                if pending is not None and start <= pending[1]:
                    pending = (pending[0], max(pending[1], end))
                    continue
                if pending is not None:
                    yield pending
                pending = (start, end)
            day += ONE_DAY
        if pending is not None:
            yield pending

    def _local_day(self, at: float) -> date:
        return datetime.fromtimestamp(at, self.timezone).date()

    def _instant(self, day: date, minute: int) -> float:
        """The Unix time at which the local clock reads `minute` minutes after `day`'s midnight.

        Times shown twice are their first occurrence (fold 0); a skipped time is the jump.
        """
        wall = datetime.combine(day, time()) + timedelta(minutes=minute)
        first = wall.replace(tzinfo=self.timezone).timestamp()
        if datetime.fromtimestamp(first, self.timezone).replace(tzinfo=None) == wall:
            return first
        return self._jump(wall.replace(tzinfo=self.timezone, fold=1).timestamp(), first)

    def _jump(self, before: float, after: float) -> float:
        """The instant the clock jumps forward, found between an instant before and one after."""
        offset_after = datetime.fromtimestamp(after, self.timezone).utcoffset()
        while after - before > 1:
            middle = (before + after) // 2
            if datetime.fromtimestamp(middle, self.timezone).utcoffset() == offset_after:
                after = middle
            else:
                before = middle
        return after


ALWAYS_OPEN = Calendar(timezone=ZoneInfo("UTC"), week=Week((FULL_DAY,) * len(WEEKDAYS)))
"""The calendar of an account without `hours`: open at every instant."""


def parse_hours(raw: object, path: str = "hours") -> Calendar:
    """The calendar of an `hours:` mapping as read from the YAML configuration.

    `path` is where the mapping sits (`hours`, `accounts[0].hours`). Raises config.ConfigError
    with one `<key path>: <problem>` line per fault found.
    """
    reader = _HoursReader()
    calendar = reader.calendar(raw, path)
    if reader.errors or calendar is None:
        raise config.ConfigError(reader.errors or [f"{path}: unusable"])
    return calendar


class _HoursReader:
    """Walks the `hours:` mapping, collecting every error instead of stopping at the first."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def error(self, path: str, problem: str) -> None:
        self.errors.append(f"{path}: {problem}")

    def calendar(self, raw: object, path: str) -> Calendar | None:
        section = self.mapping(raw, path, {"timezone", "open", "holidays"})
        if section is None:
            return None
        timezone = self.timezone(section.get("timezone"), f"{path}.timezone")
        week = self.week(section.get("open"), f"{path}.open")
        holidays = self.holidays(section.get("holidays"), f"{path}.holidays")
        if timezone is None or week is None or holidays is None:
            return None
        return Calendar(timezone=timezone, week=week, holidays=holidays)

    def mapping(self, raw: object, path: str, allowed: set[str]) -> dict[Any, Any] | None:
        if not isinstance(raw, dict):
            self.error(path, f"must be a mapping, not {_kind(raw)}")
            return None
        for key in raw:
            if key not in allowed:
                self.error(f"{path}.{key}", f"unknown key (expected one of {sorted(allowed)})")
        return raw

    def timezone(self, raw: object, path: str) -> ZoneInfo | None:
        if raw is None:
            self.error(path, "required: an IANA time zone name such as Europe/Bratislava")
            return None
        if isinstance(raw, str) and raw.strip():
            try:
                return ZoneInfo(raw.strip())
            except (ZoneInfoNotFoundError, ValueError, OSError):
                pass
        self.error(path, f"unknown time zone {raw!r} (an IANA name such as Europe/Bratislava)")
        return None

    # -- the week ------------------------------------------------------------------------------

    def week(self, raw: object, path: str) -> Week | None:
        if raw is None:
            self.error(path, f"required: the weekly ranges, e.g. mon-fri: {RANGE_EXAMPLE}")
            return None
        if not isinstance(raw, dict) or not raw:
            self.error(path, f"must map weekdays to ranges, e.g. mon-fri: {RANGE_EXAMPLE}")
            return None
        days: list[Ranges] = [()] * len(WEEKDAYS)
        given_by: list[str | None] = [None] * len(WEEKDAYS)
        for key, value in raw.items():
            weekdays = self.weekdays(key, f"{path}.{key}")
            ranges = self.ranges(value, f"{path}.{key}")
            for weekday in weekdays or []:
                earlier = given_by[weekday]
                if earlier is not None:
                    self.error(
                        f"{path}.{key}", f"{WEEKDAYS[weekday]} is already given by {earlier}"
                    )
                    continue
                given_by[weekday] = str(key)
                days[weekday] = () if ranges is None else ranges
        self.no_overnight_overlap(days, given_by, path)
        return Week(tuple(days))

    def weekdays(self, key: object, path: str) -> list[int] | None:
        """The weekdays (0 is Monday) of a key such as `mon-fri`, `sun-thu`, `sat`, `mon,wed`."""
        if not isinstance(key, str):
            self.error(path, f"unknown weekday {key!r}: use {', '.join(WEEKDAYS)} or a span")
            return None
        weekdays: list[int] = []
        for part in key.lower().split(","):
            first, dash, last = (text.strip() for text in part.partition("-"))
            if first not in WEEKDAYS or (dash and last not in WEEKDAYS):
                self.error(
                    path,
                    f"unknown weekday {part.strip()!r}: use {', '.join(WEEKDAYS)} "
                    "or a span such as mon-fri",
                )
                return None
            start, end = WEEKDAYS.index(first), WEEKDAYS.index(last if dash else first)
            # A span may wrap past Sunday: sun-thu is a night shift's week.
            for weekday in (day % len(WEEKDAYS) for day in range(start, _wrapped(start, end) + 1)):
                if weekday in weekdays:
                    self.error(path, f"{WEEKDAYS[weekday]} appears twice")
                    return None
                weekdays.append(weekday)
        return weekdays

    def no_overnight_overlap(
        self, days: list[Ranges], given_by: list[str | None], path: str
    ) -> None:
        """A range past midnight must close before the next day's first range opens."""
        for weekday, ranges in enumerate(days):
            following = (weekday + 1) % len(WEEKDAYS)
            for night in ranges:
                spill = night.end - MINUTES_PER_DAY
                for morning in days[following]:
                    if morning.start < spill:
                        self.error(
                            f"{path}.{given_by[following]}",
                            f"{morning} on {WEEKDAYS[following]} overlaps {night} from "
                            f"{WEEKDAYS[weekday]}, which runs past midnight",
                        )

    # -- ranges --------------------------------------------------------------------------------

    def ranges(self, raw: object, path: str) -> Ranges | None:
        """Ranges written "08:00-12:00, 12:30-17:00" (or as a list of such strings)."""
        if isinstance(raw, list) and all(isinstance(item, str) for item in raw):
            raw = ",".join(raw)
        if not isinstance(raw, str):
            self.error(path, f"must be ranges such as {RANGE_EXAMPLE}, not {_kind(raw)}")
            return None
        if not raw.strip():
            self.error(path, "no ranges: leave the day out to keep it closed")
            return None
        ranges: list[OpenRange] = []
        for text in raw.split(","):
            try:
                ranges.append(_parse_range(text))
            except ValueError as exc:
                self.error(path, str(exc))
                return None
        ranges.sort()
        for earlier, later in pairwise(ranges):
            if later.start < earlier.end:
                self.error(path, f"{earlier} and {later} overlap")
                return None
        return tuple(ranges)

    # -- holidays ------------------------------------------------------------------------------

    def holidays(self, raw: object, path: str) -> Holidays | None:
        if raw is None:
            return Holidays()
        section = self.mapping(raw, path, {"country", "subdivision", "closed", "open"})
        if section is None:
            return None
        country, subdivision = self.country(section, path)
        closed = self.closed_dates(section.get("closed"), f"{path}.closed")
        open_dates = self.open_dates(section.get("open"), f"{path}.open")
        for day in open_dates:
            if day in closed:
                self.error(f"{path}.open.{day}", "also listed in closed: keep it in one of them")
        return Holidays(
            country=country,
            subdivision=subdivision,
            closed=frozenset(closed),
            open=MappingProxyType(open_dates),
        )

    def country(self, section: dict[Any, Any], path: str) -> tuple[str | None, str | None]:
        raw_country, raw_subdivision = section.get("country"), section.get("subdivision")
        if raw_country is None:
            if raw_subdivision is not None:
                self.error(f"{path}.subdivision", "needs a country")
            return None, None
        country = raw_country.strip().upper() if isinstance(raw_country, str) else ""
        try:
            country_holidays(country)
        except NotImplementedError:
            self.error(
                f"{path}.country",
                f"unknown country code {raw_country!r}: use a code the holidays package "
                "covers, such as SK, CZ or DE",
            )
            return None, None
        if raw_subdivision is None:
            return country, None
        known = list_supported_countries().get(country) or []
        # Codes are upper case but for a few countries; accept by as well as BY.
        written = str(raw_subdivision).strip()
        subdivision = next((code for code in known if code.upper() == written.upper()), written)
        try:
            country_holidays(country, subdiv=subdivision)
        except NotImplementedError:
            choice = f"one of {', '.join(known)}" if known else "none: leave it out"
            self.error(
                f"{path}.subdivision",
                f"{country} has no subdivision {raw_subdivision!r} ({choice})",
            )
            return country, None
        return country, subdivision

    def closed_dates(self, raw: object, path: str) -> set[date]:
        if raw is None:
            return set()
        if not isinstance(raw, list):
            self.error(path, f'must be a list of dates such as ["2026-12-24"], not {_kind(raw)}')
            return set()
        dates = (self.date(item, f"{path}[{index}]") for index, item in enumerate(raw))
        return {day for day in dates if day is not None}

    def open_dates(self, raw: object, path: str) -> dict[date, Ranges]:
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            self.error(path, 'must map dates to ranges, e.g. "2026-12-20": "10:00-14:00"')
            return {}
        open_dates: dict[date, Ranges] = {}
        for key, value in raw.items():
            day = self.date(key, f"{path}.{key}")
            ranges = self.ranges(value, f"{path}.{key}")
            if day is not None and ranges is not None:
                open_dates[day] = ranges
        return open_dates

    def date(self, raw: object, path: str) -> date | None:
        # YAML reads an unquoted 2026-12-24 as a date already.
        if isinstance(raw, date) and not isinstance(raw, datetime):
            return raw
        if isinstance(raw, str) and ISO_DATE.fullmatch(raw.strip()):
            try:
                return date.fromisoformat(raw.strip())
            except ValueError:
                pass
        self.error(path, f"must be a date written YYYY-MM-DD, not {raw!r}")
        return None


def _parse_range(text: str) -> OpenRange:
    """One range such as 08:00-12:00; an end not after the start runs past midnight."""
    match = RANGE.fullmatch(text)
    if match is None:
        raise ValueError(f"bad range {text.strip()!r}: write HH:MM-HH:MM, e.g. 08:00-12:00")
    start_hour, start_minute, end_hour, end_minute = (int(part) for part in match.groups())
    if start_hour > 23 or start_minute > 59:
        raise ValueError(f"bad range {text.strip()!r}: it must start from 00:00 to 23:59")
    if end_hour > 24 or end_minute > 59 or (end_hour == 24 and end_minute):
        raise ValueError(f"bad range {text.strip()!r}: it must end from 00:00 to 24:00")
    start, end = start_hour * 60 + start_minute, end_hour * 60 + end_minute
    if start == end:
        raise ValueError(f"empty range {text.strip()!r}: for a whole day write 00:00-24:00")
    return OpenRange(start, end if end > start else end + MINUTES_PER_DAY)


def _wrapped(start: int, end: int) -> int:
    """The end of a weekday span counted on from its start, past Sunday if need be."""
    return end if end >= start else end + len(WEEKDAYS)


def _clock(minute: int) -> str:
    if minute == MINUTES_PER_DAY:
        return "24:00"
    hours, minutes = divmod(minute % MINUTES_PER_DAY, 60)
    return f"{hours:02d}:{minutes:02d}"


def _kind(value: object) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return f"the string {value!r}"
    return "nothing" if value is None else type(value).__name__
