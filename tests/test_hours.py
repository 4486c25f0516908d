"""The opening-hours calendar: weekly ranges, holidays, midnight, daylight saving, config errors.

Every instant is built from an aware datetime: Europe/Bratislava wall time where it is unambiguous,
UTC around the daylight-saving changes (2026-03-29 and 2026-10-25, both at 01:00 UTC).
"""

from datetime import UTC, date, datetime
from typing import Any
from zoneinfo import ZoneInfo

import holidays
import pytest
import yaml

from exporter.config import ConfigError
from exporter.hours import ALWAYS_OPEN, FULL_DAY, Calendar, Week, parse_hours

ZONE = ZoneInfo("Europe/Bratislava")
MINUTE = 60.0
HOUR = 3600.0

# The example of the configuration documentation, as an operator writes it.
EXAMPLE_YAML = """
hours:
  timezone: Europe/Bratislava
  open:
    mon-fri: "08:00-12:00, 12:30-17:00"
    sat: "09:00-12:00"
  holidays:
    country: SK
    closed: ["2026-12-24", "2026-12-31"]
    open: {"2026-12-20": "10:00-14:00"}
"""


def local(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> float:
    """A Unix time from a Bratislava wall time (unambiguous ones only)."""
    return datetime(year, month, day, hour, minute, tzinfo=ZONE).timestamp()


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> float:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC).timestamp()


def calendar(open_ranges: dict[str, Any], **holiday_settings: Any) -> Calendar:
    raw: dict[str, Any] = {"timezone": "Europe/Bratislava", "open": open_ranges}
    if holiday_settings:
        raw["holidays"] = holiday_settings
    return parse_hours(raw)


@pytest.fixture(scope="module")
def example() -> Calendar:
    return parse_hours(yaml.safe_load(EXAMPLE_YAML)["hours"])


def test_sk_public_holidays_used_here_come_from_the_package() -> None:
    sk = holidays.country_holidays("SK", years=[2026, 2027])
    assert date(2026, 1, 6) in sk  # Epiphany, a Tuesday
    assert date(2026, 4, 6) in sk  # Easter Monday
    assert date(2026, 12, 24) in sk
    assert date(2026, 12, 31) not in sk  # closed only by configuration
    assert date(2026, 6, 12) not in sk  # the ordinary week of the Friday examples
    assert date(2026, 6, 15) not in sk


# -- waiting in open time ----------------------------------------------------------------------


def test_friday_1755_miss_called_back_monday_0810_waited_15_open_minutes() -> None:
    office = calendar({"mon-fri": "08:00-18:00"})
    assert office.open_seconds(local(2026, 6, 12, 17, 55), local(2026, 6, 15, 8, 10)) == 15 * MINUTE


def test_friday_1755_to_monday_0810_with_the_example_hours_counts_saturday(
    example: Calendar,
) -> None:
    # Closed from 17:00 on Friday; Saturday 09:00-12:00 and Monday 08:00-08:10 count.
    waited = example.open_seconds(local(2026, 6, 12, 17, 55), local(2026, 6, 15, 8, 10))
    assert waited == 3 * HOUR + 10 * MINUTE


def test_open_seconds_of_an_empty_or_reversed_span_is_zero(example: Calendar) -> None:
    assert example.open_seconds(local(2026, 6, 12, 10), local(2026, 6, 12, 10)) == 0
    assert example.open_seconds(local(2026, 6, 12, 11), local(2026, 6, 12, 10)) == 0


def test_open_seconds_over_a_week_sums_every_range(example: Calendar) -> None:
    week = example.open_seconds(local(2026, 6, 8), local(2026, 6, 15))
    assert week == 5 * (4 * HOUR + 4.5 * HOUR) + 3 * HOUR


# -- the lunch break ---------------------------------------------------------------------------


def test_lunch_break_is_closed(example: Calendar) -> None:
    assert example.is_open(local(2026, 6, 12, 11, 59))
    assert not example.is_open(local(2026, 6, 12, 12, 0))  # a range excludes its end
    assert not example.is_open(local(2026, 6, 12, 12, 15))
    assert example.is_open(local(2026, 6, 12, 12, 30))  # and includes its start
    assert example.period(local(2026, 6, 12, 12, 15)) == "closed"
    assert example.period(local(2026, 6, 12, 12, 45)) == "open"


def test_lunch_break_changes_and_open_time(example: Calendar) -> None:
    assert example.next_change(local(2026, 6, 12, 11)) == local(2026, 6, 12, 12)
    assert example.next_change(local(2026, 6, 12, 12)) == local(2026, 6, 12, 12, 30)
    assert example.next_change(local(2026, 6, 12, 12, 10)) == local(2026, 6, 12, 12, 30)
    assert example.open_seconds(local(2026, 6, 12, 11), local(2026, 6, 12, 13)) == 1.5 * HOUR


# -- weekends and holidays ---------------------------------------------------------------------


def test_next_change_across_the_weekend(example: Calendar) -> None:
    assert example.next_change(local(2026, 6, 12, 16)) == local(2026, 6, 12, 17)
    assert example.next_change(local(2026, 6, 12, 17)) == local(2026, 6, 13, 9)
    assert example.next_change(local(2026, 6, 13, 12)) == local(2026, 6, 15, 8)
    assert not example.is_open(local(2026, 6, 14, 10))  # Sunday is not listed


def test_public_holiday_from_the_package_is_closed(example: Calendar) -> None:
    assert not example.is_open(local(2026, 1, 6, 10))
    assert example.period(local(2026, 1, 6, 10)) == "closed"
    assert example.is_open(local(2026, 1, 7, 10))
    assert example.next_change(local(2026, 1, 5, 17)) == local(2026, 1, 7, 8)
    assert example.open_seconds(local(2026, 1, 6), local(2026, 1, 7)) == 0


def test_next_change_across_christmas(example: Calendar) -> None:
    # 24th (holiday, also configured closed), 25th and 26th (holidays), then Sunday.
    assert example.next_change(local(2026, 12, 23, 17)) == local(2026, 12, 28, 8)


def test_configured_closed_day(example: Calendar) -> None:
    assert example.is_open(local(2026, 12, 30, 10))
    assert not example.is_open(local(2026, 12, 31, 10))
    # New Year's Day is a holiday; Saturday 2 January opens as usual.
    assert example.next_change(local(2026, 12, 30, 17)) == local(2027, 1, 2, 9)


def test_exceptional_opening_on_a_sunday(example: Calendar) -> None:
    assert not example.is_open(local(2026, 12, 20, 9, 59))
    assert example.is_open(local(2026, 12, 20, 10))
    assert example.next_change(local(2026, 12, 19, 12)) == local(2026, 12, 20, 10)
    assert example.next_change(local(2026, 12, 20, 10)) == local(2026, 12, 20, 14)
    assert example.open_seconds(local(2026, 12, 20), local(2026, 12, 21)) == 4 * HOUR


def test_exceptional_opening_on_a_holiday_replaces_its_ranges() -> None:
    office = calendar(
        {"mon-fri": "08:00-12:00, 12:30-17:00"}, country="SK", open={"2026-01-06": "09:00-12:00"}
    )
    assert not office.is_open(local(2026, 1, 6, 8, 30))
    assert office.is_open(local(2026, 1, 6, 9))
    assert not office.is_open(local(2026, 1, 6, 13))  # the weekday's afternoon does not apply
    assert office.open_seconds(local(2026, 1, 6), local(2026, 1, 7)) == 3 * HOUR


def test_exceptional_opening_on_a_working_day_replaces_its_ranges() -> None:
    office = calendar({"mon-fri": "08:00-17:00"}, open={"2026-06-12": "10:00-11:00"})
    assert not office.is_open(local(2026, 6, 12, 9))
    assert office.is_open(local(2026, 6, 12, 10, 30))
    assert office.next_change(local(2026, 6, 12, 10, 30)) == local(2026, 6, 12, 11)


def test_subdivision_holidays_apply() -> None:
    # Epiphany is a holiday in Bavaria, not in Berlin.
    assert date(2026, 1, 6) in holidays.country_holidays("DE", subdiv="BY", years=2026)
    bavaria = calendar({"mon-fri": "08:00-17:00"}, country="de", subdivision="by")
    berlin = calendar({"mon-fri": "08:00-17:00"}, country="DE", subdivision="BE")
    assert (bavaria.holidays.country, bavaria.holidays.subdivision) == ("DE", "BY")
    assert not bavaria.is_open(local(2026, 1, 6, 10))
    assert berlin.is_open(local(2026, 1, 6, 10))


# -- ranges past midnight ----------------------------------------------------------------------


def test_night_range_runs_into_the_next_morning() -> None:
    nights = calendar({"sun-thu": "22:00-06:00"})
    assert nights.is_open(local(2026, 6, 16, 23))  # Tuesday night
    assert nights.is_open(local(2026, 6, 17, 5, 59))
    assert not nights.is_open(local(2026, 6, 17, 6))
    assert nights.is_open(local(2026, 6, 19, 2))  # Thursday's night, on Friday
    assert not nights.is_open(local(2026, 6, 19, 23))  # Friday is not listed
    assert nights.next_change(local(2026, 6, 18, 23)) == local(2026, 6, 19, 6)
    assert nights.next_change(local(2026, 6, 19, 6)) == local(2026, 6, 21, 22)
    assert nights.open_seconds(local(2026, 6, 21, 12), local(2026, 6, 22, 12)) == 8 * HOUR


def test_open_time_counted_from_inside_a_night_started_the_day_before() -> None:
    nights = calendar({"sun-thu": "22:00-06:00"})
    assert nights.open_seconds(local(2026, 6, 16, 2), local(2026, 6, 16, 12)) == 4 * HOUR


def test_sunday_night_into_a_monday_holiday_belongs_to_sunday() -> None:
    # Easter Monday 2026-04-06: Sunday's night still runs to 06:00; Monday night stays closed.
    nights = calendar({"sun-thu": "22:00-06:00"}, country="SK")
    assert nights.is_open(local(2026, 4, 5, 23))
    assert nights.is_open(local(2026, 4, 6, 5))
    assert nights.next_change(local(2026, 4, 6, 5)) == local(2026, 4, 6, 6)
    assert not nights.is_open(local(2026, 4, 6, 23))
    assert not nights.is_open(local(2026, 4, 7, 1))
    assert nights.next_change(local(2026, 4, 6, 6)) == local(2026, 4, 7, 22)


def test_ranges_meeting_at_midnight_are_one_opening() -> None:
    late = calendar({"mon": "20:00-24:00", "tue": "00:00-08:00"})
    assert late.is_open(local(2026, 6, 16, 0))
    assert late.next_change(local(2026, 6, 15, 21)) == local(2026, 6, 16, 8)
    assert late.open_seconds(local(2026, 6, 15), local(2026, 6, 17)) == 12 * HOUR


def test_midnight_as_an_end_is_24_00() -> None:
    assert calendar({"mon": "22:00-00:00"}) == calendar({"mon": "22:00-24:00"})


# -- daylight saving ---------------------------------------------------------------------------


def test_night_across_the_spring_change_is_an_hour_shorter() -> None:
    # Saturday 22:00 CET (21:00 UTC) to Sunday 06:00 CEST (04:00 UTC).
    nights = calendar({"sat": "22:00-06:00"})
    assert not nights.is_open(utc(2026, 3, 28, 20, 59))
    assert nights.is_open(utc(2026, 3, 28, 21))
    assert nights.is_open(utc(2026, 3, 29, 0, 59, 59))  # 01:59:59 CET
    assert nights.is_open(utc(2026, 3, 29, 1))  # 03:00 CEST
    assert not nights.is_open(utc(2026, 3, 29, 4))
    assert nights.next_change(utc(2026, 3, 28, 23)) == utc(2026, 3, 29, 4)
    assert nights.open_seconds(utc(2026, 3, 28, 12), utc(2026, 3, 29, 12)) == 7 * HOUR


def test_night_across_the_autumn_change_is_an_hour_longer() -> None:
    # Saturday 22:00 CEST (20:00 UTC) to Sunday 06:00 CET (05:00 UTC).
    nights = calendar({"sat": "22:00-06:00"})
    assert nights.is_open(utc(2026, 10, 24, 20))
    assert nights.is_open(utc(2026, 10, 25, 0, 30))  # the first 02:30
    assert nights.is_open(utc(2026, 10, 25, 1, 30))  # the second 02:30
    assert nights.is_open(utc(2026, 10, 25, 4, 59))
    assert not nights.is_open(utc(2026, 10, 25, 5))
    assert nights.next_change(utc(2026, 10, 24, 21)) == utc(2026, 10, 25, 5)
    assert nights.open_seconds(utc(2026, 10, 24, 12), utc(2026, 10, 25, 12)) == 9 * HOUR


def test_whole_day_on_the_change_days_is_23_and_25_hours() -> None:
    sundays = calendar({"sun": "00:00-24:00"})
    assert sundays.open_seconds(utc(2026, 3, 28), utc(2026, 3, 30)) == 23 * HOUR
    assert sundays.open_seconds(utc(2026, 10, 24), utc(2026, 10, 26)) == 25 * HOUR


def test_office_hours_keep_their_wall_clock_across_the_changes() -> None:
    office = calendar({"mon-fri": "08:00-17:00"})
    # Before the spring change 08:00 is 07:00 UTC; after it, 06:00 UTC.
    assert not office.is_open(utc(2026, 3, 27, 6, 30))
    assert office.is_open(utc(2026, 3, 30, 6, 30))
    assert office.next_change(utc(2026, 3, 27, 16)) == utc(2026, 3, 30, 6)
    assert office.open_seconds(utc(2026, 3, 27, 15, 55), utc(2026, 3, 30, 6, 5)) == 10 * MINUTE
    # After the autumn change 08:00 is 07:00 UTC again.
    assert office.next_change(utc(2026, 10, 23, 15)) == utc(2026, 10, 26, 7)
    assert office.open_seconds(utc(2026, 10, 23, 14, 55), utc(2026, 10, 26, 7, 5)) == 10 * MINUTE


def test_a_skipped_wall_time_opens_when_the_clock_jumps() -> None:
    early = calendar({"sun": "02:30-04:00"})
    # 29 March: 02:30 does not exist; the range runs from 03:00 CEST (01:00 UTC) to 04:00 CEST.
    assert early.next_change(utc(2026, 3, 28, 23)) == utc(2026, 3, 29, 1)
    assert early.next_change(utc(2026, 3, 29, 1)) == utc(2026, 3, 29, 2)
    assert early.open_seconds(utc(2026, 3, 28, 12), utc(2026, 3, 29, 12)) == 1 * HOUR


def test_a_doubled_wall_time_is_its_first_occurrence() -> None:
    early = calendar({"sun": "02:30-04:00"})
    # 25 October: the first 02:30 is 00:30 UTC; 04:00 CET is 03:00 UTC.
    assert early.next_change(utc(2026, 10, 24, 23)) == utc(2026, 10, 25, 0, 30)
    assert early.open_seconds(utc(2026, 10, 24, 12), utc(2026, 10, 25, 12)) == 2.5 * HOUR


# -- always open, never open -------------------------------------------------------------------


def test_always_open_calendar() -> None:
    assert ALWAYS_OPEN.always_open
    assert ALWAYS_OPEN.is_open(local(2026, 12, 24, 23))
    assert ALWAYS_OPEN.period(local(2026, 12, 24, 23)) == "open"
    assert ALWAYS_OPEN.next_change(local(2026, 12, 24, 23)) is None
    span = (local(2026, 6, 12, 17, 55), local(2026, 6, 15, 8, 10))
    assert ALWAYS_OPEN.open_seconds(*span) == span[1] - span[0]


def test_round_the_clock_hours_with_holidays_change_only_on_holidays() -> None:
    hotline = calendar({"mon-sun": "00:00-24:00"}, country="SK")
    assert not hotline.always_open
    assert hotline.next_change(local(2026, 6, 12, 10)) == local(2026, 7, 5)
    assert hotline.next_change(local(2026, 7, 5)) == local(2026, 7, 6)


def test_round_the_clock_hours_that_never_close_have_no_next_change() -> None:
    # Not recognised as always open (it has a date of its own), yet it never changes.
    hotline = calendar({"mon-sun": "00:00-24:00"}, open={"2026-12-24": "00:00-24:00"})
    assert not hotline.always_open
    assert hotline.is_open(local(2026, 12, 24, 12))
    assert hotline.next_change(local(2026, 6, 12, 10)) is None


def test_a_calendar_without_ranges_never_opens() -> None:
    never = Calendar(timezone=ZONE, week=Week(((),) * 7))
    assert not never.is_open(local(2026, 6, 12, 10))
    assert never.next_change(local(2026, 6, 12, 10)) is None
    assert never.open_seconds(local(2026, 6, 12), local(2026, 6, 19)) == 0


def test_full_week_calendar_built_by_hand_is_always_open() -> None:
    assert Calendar(timezone=ZONE, week=Week((FULL_DAY,) * 7)).always_open


# -- parsing -----------------------------------------------------------------------------------


def test_example_parses_with_yaml_dates_and_lists() -> None:
    raw = yaml.safe_load(
        """
        timezone: Europe/Bratislava
        open:
          mon,wed: ["08:00-12:00", "12:30-17:00"]
          tue: 08:00-12:00
        holidays:
          country: sk
          closed: [2026-12-31]
          open: {2026-12-20: "10:00-14:00"}
        """
    )
    parsed = parse_hours(raw)
    assert parsed.holidays.country == "SK"
    assert parsed.holidays.closed == {date(2026, 12, 31)}
    assert [str(r) for r in parsed.ranges_on(date(2026, 6, 17))] == ["08:00-12:00", "12:30-17:00"]
    assert [str(r) for r in parsed.ranges_on(date(2026, 6, 16))] == ["08:00-12:00"]
    assert parsed.ranges_on(date(2026, 6, 18)) == ()
    assert [str(r) for r in parsed.ranges_on(date(2026, 12, 20))] == ["10:00-14:00"]


def test_ranges_on_follows_the_order_of_rules(example: Calendar) -> None:
    assert [str(r) for r in example.ranges_on(date(2026, 6, 13))] == ["09:00-12:00"]
    assert example.ranges_on(date(2026, 1, 6)) == ()  # holiday
    assert example.ranges_on(date(2026, 12, 31)) == ()  # closed
    assert [str(r) for r in example.ranges_on(date(2026, 12, 20))] == ["10:00-14:00"]


def test_night_range_prints_its_wall_clock_ends() -> None:
    nights = calendar({"mon": "22:00-06:00"})
    assert [str(r) for r in nights.week.days[0]] == ["22:00-06:00"]


VALID: dict[str, Any] = {"timezone": "Europe/Bratislava", "open": {"mon-fri": "08:00-17:00"}}


def with_changes(**changes: Any) -> dict[str, Any]:
    return {**VALID, **changes}


CONFIG_ERRORS: list[tuple[object, str]] = [
    ("always", "hours: must be a mapping, not the string 'always'"),
    (
        with_changes(opening="08:00-17:00"),
        "hours.opening: unknown key (expected one of ['holidays', 'open', 'timezone'])",
    ),
    (
        {"open": VALID["open"]},
        "hours.timezone: required: an IANA time zone name such as Europe/Bratislava",
    ),
    (
        with_changes(timezone="Mars/Olympus"),
        "hours.timezone: unknown time zone 'Mars/Olympus' (an IANA name such as Europe/Bratislava)",
    ),
    (
        with_changes(timezone="Europe"),
        "hours.timezone: unknown time zone 'Europe' (an IANA name such as Europe/Bratislava)",
    ),
    (
        {"timezone": "UTC"},
        'hours.open: required: the weekly ranges, e.g. mon-fri: "08:00-12:00, 12:30-17:00"',
    ),
    (
        with_changes(open={"mon-fri": "8-17"}),
        "hours.open.mon-fri: bad range '8-17': write HH:MM-HH:MM, e.g. 08:00-12:00",
    ),
    (
        with_changes(open={"mon-fri": "08:00-12:00; 12:30-17:00"}),
        "hours.open.mon-fri: bad range '08:00-12:00; 12:30-17:00': write HH:MM-HH:MM, "
        "e.g. 08:00-12:00",
    ),
    (
        with_changes(open={"mon": "24:00-06:00"}),
        "hours.open.mon: bad range '24:00-06:00': it must start from 00:00 to 23:59",
    ),
    (
        with_changes(open={"mon": "08:00-24:30"}),
        "hours.open.mon: bad range '08:00-24:30': it must end from 00:00 to 24:00",
    ),
    (
        with_changes(open={"mon": "08:60-12:00"}),
        "hours.open.mon: bad range '08:60-12:00': it must start from 00:00 to 23:59",
    ),
    (
        with_changes(open={"mon": "08:00-08:00"}),
        "hours.open.mon: empty range '08:00-08:00': for a whole day write 00:00-24:00",
    ),
    (
        with_changes(open={"mon": ""}),
        "hours.open.mon: no ranges: leave the day out to keep it closed",
    ),
    (
        with_changes(open={"mon": 480}),
        'hours.open.mon: must be ranges such as "08:00-12:00, 12:30-17:00", not a number',
    ),
    (
        with_changes(open={"mon-fri": "08:00-12:00, 11:00-13:00"}),
        "hours.open.mon-fri: 08:00-12:00 and 11:00-13:00 overlap",
    ),
    (
        with_changes(open={"mon": "22:00-06:00, 23:00-23:30"}),
        "hours.open.mon: 22:00-06:00 and 23:00-23:30 overlap",
    ),
    (
        with_changes(open={"sun": "22:00-06:00", "mon-fri": "05:00-07:00"}),
        "hours.open.mon-fri: 05:00-07:00 on mon overlaps 22:00-06:00 from sun, "
        "which runs past midnight",
    ),
    (
        with_changes(open={"monday": "08:00-17:00"}),
        "hours.open.monday: unknown weekday 'monday': use mon, tue, wed, thu, fri, sat, sun "
        "or a span such as mon-fri",
    ),
    (
        with_changes(open={"mon-fry": "08:00-17:00"}),
        "hours.open.mon-fry: unknown weekday 'mon-fry': use mon, tue, wed, thu, fri, sat, sun "
        "or a span such as mon-fri",
    ),
    (
        with_changes(open={"fri-mon": "08:00-17:00", "sat": "09:00-12:00"}),
        "hours.open.sat: sat is already given by fri-mon",
    ),
    (
        with_changes(open={"mon-fri": "08:00-17:00", "wed": "08:00-12:00"}),
        "hours.open.wed: wed is already given by mon-fri",
    ),
    (
        with_changes(open={"mon-wed,tue": "08:00-17:00"}),
        "hours.open.mon-wed,tue: tue appears twice",
    ),
    (
        with_changes(open={}),
        'hours.open: must map weekdays to ranges, e.g. mon-fri: "08:00-12:00, 12:30-17:00"',
    ),
    (
        with_changes(holidays={"country": "XX"}),
        "hours.holidays.country: unknown country code 'XX': use a code the holidays package "
        "covers, such as SK, CZ or DE",
    ),
    (
        with_changes(holidays={"country": "SK", "subdivision": "BL"}),
        "hours.holidays.subdivision: SK has no subdivision 'BL' (none: leave it out)",
    ),
    (
        with_changes(holidays={"subdivision": "BY"}),
        "hours.holidays.subdivision: needs a country",
    ),
    (
        with_changes(holidays={"region": "BY"}),
        "hours.holidays.region: unknown key (expected one of "
        "['closed', 'country', 'open', 'subdivision'])",
    ),
    (
        with_changes(holidays={"closed": ["2026-12-24", "2026-02-30"]}),
        "hours.holidays.closed[1]: must be a date written YYYY-MM-DD, not '2026-02-30'",
    ),
    (
        with_changes(holidays={"closed": ["24.12.2026"]}),
        "hours.holidays.closed[0]: must be a date written YYYY-MM-DD, not '24.12.2026'",
    ),
    (
        with_changes(holidays={"closed": "2026-12-24"}),
        'hours.holidays.closed: must be a list of dates such as ["2026-12-24"], '
        "not the string '2026-12-24'",
    ),
    (
        with_changes(holidays={"open": {"2026-13-01": "10:00-14:00"}}),
        "hours.holidays.open.2026-13-01: must be a date written YYYY-MM-DD, not '2026-13-01'",
    ),
    (
        with_changes(holidays={"open": {"2026-12-20": "10:00-"}}),
        "hours.holidays.open.2026-12-20: bad range '10:00-': write HH:MM-HH:MM, e.g. 08:00-12:00",
    ),
    (
        with_changes(holidays={"open": ["2026-12-20"]}),
        'hours.holidays.open: must map dates to ranges, e.g. "2026-12-20": "10:00-14:00"',
    ),
    (
        with_changes(holidays={"closed": ["2026-12-20"], "open": {"2026-12-20": "10:00-14:00"}}),
        "hours.holidays.open.2026-12-20: also listed in closed: keep it in one of them",
    ),
]


@pytest.mark.parametrize(("raw", "expected"), CONFIG_ERRORS)
def test_config_error_names_its_key_path(raw: object, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_hours(raw)
    assert caught.value.errors == [expected]


def test_unknown_subdivision_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_hours(with_changes(holidays={"country": "DE", "subdivision": "XX"}))
    [error] = caught.value.errors
    assert error.startswith("hours.holidays.subdivision: DE has no subdivision 'XX' (one of ")
    assert "BY" in error


def test_every_error_is_reported_under_the_given_path() -> None:
    raw = {
        "timezone": "Nowhere",
        "open": {"mon-fri": "8-17", "wed": "09:00-10:00"},
        "holidays": {"country": "XX", "closed": ["tomorrow"]},
    }
    with pytest.raises(ConfigError) as caught:
        parse_hours(raw, "accounts[0].hours")
    assert [error.split(":")[0] for error in caught.value.errors] == [
        "accounts[0].hours.timezone",
        "accounts[0].hours.open.mon-fri",
        "accounts[0].hours.open.wed",
        "accounts[0].hours.holidays.country",
        "accounts[0].hours.holidays.closed[0]",
    ]
