"""Configuration: defaults, environment references, secret files, errors named by key path."""

from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import Any

import pytest
import yaml

from exporter.config import (
    DEFAULT_RING_BUCKETS,
    Config,
    ConfigError,
    StoreConfig,
    example_secret_accounts,
    find_config_path,
    load_config,
    locate_config,
    mask_password,
    parse_config,
)
from exporter.hours import ALWAYS_OPEN, parse_hours

ROOT = Path(__file__).parent.parent
MINIMAL = {"accounts": [{"id": 10123, "secret": "s3cret"}]}


def errors_of(document: Any, base_dir: Path = Path()) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(document, base_dir)
    return caught.value.errors


def test_example_config_loads_as_it_is() -> None:
    config = load_config(ROOT / "config.example.yaml")
    assert list(config.accounts) == [10123]
    assert config.server.bind == "0.0.0.0:9880"
    assert config.extensions[10123]["102"].labels == {"team": "sales"}
    assert config.calls.max_duration == 4 * 3600


def test_defaults_of_a_minimal_config() -> None:
    config = parse_config(MINIMAL)
    assert config.server.workers == 2
    assert config.server.max_body_bytes == 65536
    assert config.server.webhook_path == "/webhook"
    assert config.limits.max_extensions == 1000
    assert config.store.path == "./data/mcn-exporter.sqlite3"
    assert config.metrics.histogram_extension_label is False
    assert {5.0, 10.0, 20.0, 30.0, 60.0} <= set(DEFAULT_RING_BUCKETS)


def test_caller_defaults() -> None:
    config = parse_config(MINIMAL)
    assert config.callers.group_window == 10
    assert config.callers.settle == 30
    assert config.callbacks.give_up_after == 72 * 3600
    assert config.callbacks.match_digits == 9
    assert config.lines()[10123].label_values() == ("", "other")


def test_lines_match_by_their_last_digits_and_unquoted_numbers_are_taken() -> None:
    config = parse_config(
        {
            "accounts": [
                {
                    "id": 1,
                    "secret": "x",
                    "lines": {"0222202999": "Main line", 421850123456: "Sales"},
                }
            ],
            "callers": {"group_window": "5s", "settle": "1m"},
            "callbacks": {"give_up_after": "48h", "match_digits": 8},
        }
    )
    lines = config.lines()[1]
    assert lines.line("+421 2 2220 2999") == "Main line"
    assert lines.line("0850 123 456") == "Sales"
    assert lines.line("0999888777") == "other"
    assert lines.line(None) == ""
    assert lines.match_digits == 8
    assert (config.callers.group_window, config.callers.settle) == (5, 60)
    assert config.callbacks.give_up_after == 48 * 3600


def test_config_is_frozen() -> None:
    config = parse_config(MINIMAL)
    with pytest.raises(AttributeError):
        config.server = config.server  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.accounts[1] = config.accounts[10123]  # type: ignore[index]


def test_secret_is_kept_out_of_the_repr() -> None:
    assert "s3cret" not in repr(parse_config(MINIMAL))


def test_environment_references(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCN_TEST_SECRET", "from-env")
    monkeypatch.setenv("MCN_TEST_WORKERS", "5")
    monkeypatch.delenv("MCN_TEST_UNSET", raising=False)
    config = parse_config(
        {
            "server": {"workers": "${MCN_TEST_WORKERS}", "bind": "${MCN_TEST_UNSET:-127.0.0.1:1}"},
            "accounts": [{"id": 1, "secret": "${MCN_TEST_SECRET}"}],
        }
    )
    assert config.accounts[1].secret == "from-env"
    assert config.server.workers == 5
    assert config.server.bind == "127.0.0.1:1"


def test_bucket_bounds_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCN_TEST_BOUND", "45")
    document = {**MINIMAL, "metrics": {"ring_buckets": [5, "${MCN_TEST_BOUND}", 90]}}
    assert parse_config(document).metrics.ring_buckets == (5.0, 45.0, 90.0)


def test_unset_variable_in_a_bucket_bound_is_named_by_its_index(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("MCN_TEST_UNSET", raising=False)
    document = {**MINIMAL, "metrics": {"ring_buckets": [5, "${MCN_TEST_UNSET}"]}}
    assert "metrics.ring_buckets[1]: environment variable MCN_TEST_UNSET is not set" in (
        errors_of(document)
    )


def test_unset_environment_variable_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MCN_TEST_UNSET", raising=False)
    assert errors_of({"accounts": [{"id": 1, "secret": "${MCN_TEST_UNSET}"}]}) == [
        "accounts[0].secret: environment variable MCN_TEST_UNSET is not set",
    ]


def test_secret_file_relative_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "secret.txt").write_text("from-file\n")
    document = {"accounts": [{"id": 1, "secret_file": "secret.txt"}]}
    assert parse_config(document, tmp_path).accounts[1].secret == "from-file"


@pytest.mark.parametrize(
    ("document", "error"),
    [
        ({}, "accounts: required: list at least one account (id and secret)"),
        ({"accounts": []}, "accounts: must be a non-empty list of accounts"),
        ({"accounts": [{"id": 1}]}, "accounts[0].secret: required (or secret_file)"),
        ({"accounts": [{"secret": "x"}]}, "accounts[0].id: required"),
        ({"accounts": [{"id": -3, "secret": "x"}]}, "accounts[0].id: must be a positive integer"),
        (
            {"accounts": [{"id": 1, "secret": "x"}, {"id": 1, "secret": "y"}]},
            "accounts[1].id: account 1 is listed twice",
        ),
        (
            {"accounts": [{"id": 1, "secret": "x", "secret_file": "f"}]},
            "accounts[0].secret: give either secret or secret_file, not both",
        ),
        (
            {"accounts": [{"id": 1, "secret_file": "nope.txt"}]},
            "accounts[0].secret_file: cannot read nope.txt",
        ),
        ({**MINIMAL, "server": {"bind": "9880"}}, "server.bind: must be HOST:PORT"),
        ({**MINIMAL, "server": {"workers": 0}}, "server.workers: must be an integer from 1 to 64"),
        (
            {**MINIMAL, "server": {"webhook_path": "/metrics"}},
            "server.webhook_path: must start with / and not be one of ['/', '/healthz', "
            "'/metrics', '/readyz'], not '/metrics'",
        ),
        ({**MINIMAL, "server": {"colour": "red"}}, "server.colour: unknown key"),
        (
            {**MINIMAL, "calls": {"max_duration": "forever"}},
            "calls.max_duration: must be a positive duration",
        ),
        (
            {**MINIMAL, "metrics": {"ring_buckets": [5, 2]}},
            "metrics.ring_buckets[1]: must be above the bound before it (5), not 2",
        ),
        (
            {**MINIMAL, "metrics": {"talk_buckets": [5, "soon", 9]}},
            "metrics.talk_buckets[1]: must be a number of seconds, not 'soon'",
        ),
        (
            {**MINIMAL, "metrics": {"ring_buckets": [1, -2]}},
            "metrics.ring_buckets[1]: must be positive and finite, not -2",
        ),
        (
            {"accounts": [{"id": 1, "secret": "x"}, "10124"]},
            "accounts[1]: must be a mapping, not a string",
        ),
        (
            {**MINIMAL, "metrics": {"histogram_extension_label": "sometimes"}},
            "metrics.histogram_extension_label: must be a bool",
        ),
        (
            {**MINIMAL, "logging": {"level": "loud"}},
            "logging.level: must be one of debug, info, warning, error, not 'loud'",
        ),
        (
            {**MINIMAL, "extensions": {"777": {"1": "x"}}},
            "extensions.777: account 777 is not in accounts",
        ),
        ({**MINIMAL, "extensions": {"10123": {"1 2": "x"}}}, "extensions.10123.1 2: an extension"),
        (
            {**MINIMAL, "extensions": {"10123": {"1": {"labels": {"name": "x"}}}}},
            "extensions.10123.1.labels.name: reserved label name",
        ),
        (
            {**MINIMAL, "extensions": {"10123": {"1": {"labels": {"bad-label": "x"}}}}},
            "extensions.10123.1.labels.bad-label: not a valid Prometheus label name",
        ),
        (
            {
                **MINIMAL,
                "limits": {"max_extensions": 1},
                "extensions": {"10123": {"1": "a", "2": "b"}},
            },
            "extensions.10123: 2 extensions configured but limits.max_extensions is 1",
        ),
        ({**MINIMAL, "store": {"redis": "redis://x"}}, "store.redis: unknown key"),
        ({"accounts": [{"id": "\u00b2", "secret": "x"}]}, "accounts[0].id: must be a positive"),
        ({**MINIMAL, "server": {"workers": "\u00b2"}}, "server.workers: must be an integer"),
        ({**MINIMAL, "server": {"timeout": "nan"}}, "server.timeout: must be a positive duration"),
        (
            {**MINIMAL, "calls": {"max_duration": float("inf")}},
            "calls.max_duration: must be a positive duration",
        ),
        ([1, 2], "(root): must be a mapping, not a list"),
        (
            {"accounts": [{"id": 1, "secret": "x", "lines": {"0222202999": "other"}}]},
            "accounts[0].lines.0222202999: 'other' is the line of unconfigured numbers",
        ),
        (
            {"accounts": [{"id": 1, "secret": "x", "lines": {"0222202999": ""}}]},
            "accounts[0].lines.0222202999: the line's name must not be empty",
        ),
        (
            {"accounts": [{"id": 1, "secret": "x", "lines": {"0222202999": 5}}]},
            "accounts[0].lines.0222202999: must be the line's name, a string",
        ),
        (
            {"accounts": [{"id": 1, "secret": "x", "lines": {"main": "Main line"}}]},
            "accounts[0].lines.main: a company number needs at least one digit",
        ),
        (
            {"accounts": [{"id": 1, "secret": "x", "lines": {"0222202999": "a\nb"}}]},
            "accounts[0].lines.0222202999: must be at most 64 printable characters",
        ),
        (
            {
                "accounts": [
                    {
                        "id": 1,
                        "secret": "x",
                        "lines": {"0222202999": "Main", "+421 2 2220 2999": "Main again"},
                    }
                ]
            },
            "accounts[0].lines.+421 2 2220 2999: matches the same number as 0222202999",
        ),
        ({"accounts": [{"id": 1, "secret": "x", "lines": ["0222202999"]}]}, "accounts[0].lines:"),
        ({**MINIMAL, "callers": {"settle": "soon"}}, "callers.settle: must be a positive duration"),
        (
            {**MINIMAL, "callers": {"group_window": "40s"}},
            "callers.group_window: must not be longer than callers.settle (30s), not 40s",
        ),
        ({**MINIMAL, "callers": {"window": 1}}, "callers.window: unknown key"),
        (
            {**MINIMAL, "callbacks": {"give_up_after": 0}},
            "callbacks.give_up_after: must be a positive duration",
        ),
        (
            {**MINIMAL, "callbacks": {"match_digits": 16}},
            "callbacks.match_digits: must be an integer from 4 to 15, not 16",
        ),
    ],
)
def test_each_error_names_its_key_path(document: Any, error: str) -> None:
    errors = errors_of(document)
    assert any(line.startswith(error) for line in errors), errors


def test_every_error_is_reported_not_just_the_first() -> None:
    errors = errors_of(
        {"server": {"workers": "many", "bind": "x"}, "accounts": [{"id": "a"}], "logging": 3}
    )
    paths = [line.split(":")[0] for line in errors]
    assert paths == [
        "accounts[0].id",
        "accounts[0].secret",
        "server.bind",
        "server.workers",
        "logging",
    ]


OFFICE_HOURS = {
    "timezone": "Europe/Bratislava",
    "open": {"mon-fri": "08:00-12:00, 12:30-17:00"},
    "holidays": {"country": "SK"},
}
NIGHT_SHIFT = {"timezone": "Europe/Prague", "open": {"sun-thu": "22:00-06:00"}}


def test_without_hours_every_account_is_always_open() -> None:
    config = parse_config(MINIMAL)
    assert config.hours is None
    assert config.accounts[10123].hours is None
    assert config.calendar(10123) is ALWAYS_OPEN


def test_top_level_hours_are_the_default_of_every_account() -> None:
    config = parse_config(
        {"hours": OFFICE_HOURS, "accounts": [{"id": 1, "secret": "a"}, {"id": 2, "secret": "b"}]}
    )
    assert config.hours == parse_hours(OFFICE_HOURS)
    assert config.calendar(1) == config.calendar(2) == parse_hours(OFFICE_HOURS)
    assert config.calendar(1).holidays.country == "SK"


def test_an_accounts_own_hours_replace_the_default_whole() -> None:
    config = parse_config(
        {
            "hours": OFFICE_HOURS,
            "accounts": [
                {"id": 1, "secret": "a"},
                {"id": 2, "secret": "b", "hours": NIGHT_SHIFT},
            ],
        }
    )
    assert config.calendar(1) == parse_hours(OFFICE_HOURS)
    night = config.calendar(2)
    assert night == parse_hours(NIGHT_SHIFT)
    # Nothing is inherited key by key: no public holidays and no Friday office hours.
    assert night.holidays.country is None
    assert night.week.days[4] == ()


def test_an_account_may_have_hours_without_a_default() -> None:
    config = parse_config(
        {"accounts": [{"id": 1, "secret": "a"}, {"id": 2, "secret": "b", "hours": NIGHT_SHIFT}]}
    )
    assert config.hours is None
    assert config.calendar(1) is ALWAYS_OPEN
    assert config.calendar(2) == parse_hours(NIGHT_SHIFT)


def test_hours_errors_are_named_by_key_path_with_the_other_errors() -> None:
    errors = errors_of(
        {
            "hours": {**OFFICE_HOURS, "timezone": "Europe/Atlantis"},
            "accounts": [
                {"id": 1, "secret": "a"},
                {"id": 2, "secret": "b", "hours": {**NIGHT_SHIFT, "open": {"mon-fri": "9-5"}}},
                {"id": 3, "secret": "c", "hours": {**OFFICE_HOURS, "holidays": {"country": "XX"}}},
            ],
            "server": {"workers": 0},
        }
    )
    assert [line.split(":")[0] for line in errors] == [
        "hours.timezone",
        "accounts[1].hours.open.mon-fri",
        "accounts[2].hours.holidays.country",
        "server.workers",
    ]
    assert errors[0].startswith("hours.timezone: unknown time zone 'Europe/Atlantis'")
    assert errors[1].startswith("accounts[1].hours.open.mon-fri: bad range '9-5'")
    assert errors[2].startswith("accounts[2].hours.holidays.country: unknown country code 'XX'")


@pytest.mark.parametrize(
    ("document", "error"),
    [
        ({**MINIMAL, "hours": "9-5"}, "hours: must be a mapping, not the string '9-5'"),
        ({**MINIMAL, "hours": {"open": {"mon": "08:00-17:00"}}}, "hours.timezone: required"),
        (
            {"accounts": [{"id": 1, "secret": "x", "hours": {"timezone": "UTC"}}]},
            "accounts[0].hours.open: required",
        ),
        (
            {"accounts": [{"id": 1, "secret": "x", "hours": {**OFFICE_HOURS, "days": 5}}]},
            "accounts[0].hours.days: unknown key",
        ),
    ],
)
def test_hours_error_names_its_key_path(document: Any, error: str) -> None:
    errors = errors_of(document)
    assert any(line.startswith(error) for line in errors), errors


def test_the_commented_hours_example_parses_once_uncommented() -> None:
    lines = (ROOT / "config.example.yaml").read_text().splitlines()
    start = lines.index("# hours:")
    block = []
    for line in lines[start:]:
        if not line.startswith("#"):
            break
        block.append(line.removeprefix("# ").removeprefix("#"))
    config = parse_config({**MINIMAL, **yaml.safe_load("\n".join(block))})
    calendar = config.calendar(10123)
    assert str(calendar.timezone) == "Europe/Bratislava"
    assert calendar.holidays.country == "SK"
    assert date(2026, 12, 31) in calendar.holidays.closed
    assert date(2026, 12, 20) in calendar.holidays.open


def test_unreadable_and_invalid_yaml_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "latin1.yaml").write_bytes(b"accounts: [{id: 1, secret: caf\xe9}]\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(tmp_path / "latin1.yaml")
    (tmp_path / "secret.bin").write_bytes(b"\xff\xfe")
    assert errors_of({"accounts": [{"id": 1, "secret_file": "secret.bin"}]}, tmp_path) == [
        "accounts[0].secret_file: secret.bin is not UTF-8 text"
    ]


def test_a_yaml_error_names_the_file_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("accounts:\n  - id: 1\n    secret: [x\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.errors == [
        f"{path}:4:1: not valid YAML: expected ',' or ']', but got '<stream end>' "
        "(while parsing a flow sequence)"
    ]
    path.write_text("accounts:\n\t- id: 1\n")
    with pytest.raises(ConfigError, match=rf"^{path}:2:1: not valid YAML: found character"):
        load_config(path)


def test_every_error_of_a_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("accounts:\n  - id: 1\nlogging:\n  level: loud\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.errors == [
        f"{path}: accounts[0].secret: required (or secret_file)",
        f"{path}: logging.level: must be one of debug, info, warning, error, not 'loud'",
    ]


@pytest.mark.parametrize("unquoted", ["0123", "12345", "12.50", "0x1F", "true", "1_000"])
def test_a_secret_that_yaml_reads_as_a_number_or_boolean_must_be_quoted(
    tmp_path: Path, unquoted: str
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(f"accounts:\n  - id: 1\n    secret: {unquoted}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    kind = "a boolean" if unquoted == "true" else "a number"
    assert caught.value.errors == [
        f'{path}: accounts[0].secret: must be a string, not {kind}: quote it, e.g. secret: "0123"'
    ]
    path.write_text(f'accounts:\n  - id: 1\n    secret: "{unquoted}"\n')
    assert load_config(path).accounts[1].secret == unquoted


def test_a_numeric_secret_from_the_environment_stays_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MCN_TEST_SECRET", "0123")
    path = tmp_path / "config.yaml"
    path.write_text("accounts:\n  - id: 1\n    secret: ${MCN_TEST_SECRET}\n")
    assert load_config(path).accounts[1].secret == "0123"
    monkeypatch.delenv("MCN_TEST_SECRET")
    path.write_text("accounts:\n  - id: 1\n    secret: ${MCN_TEST_SECRET:-007}\n")
    assert load_config(path).accounts[1].secret == "007"


@pytest.mark.parametrize(
    ("content", "secret"),
    [("0123\n", "0123"), ("0123", "0123"), ("0123\r\n", "0123"), (" s p \n", " s p ")],
)
def test_a_secret_file_is_taken_as_written_less_its_final_line_end(
    tmp_path: Path, content: str, secret: str
) -> None:
    (tmp_path / "secret.txt").write_bytes(content.encode())
    document = {"accounts": [{"id": 1, "secret_file": "secret.txt"}]}
    assert parse_config(document, tmp_path).accounts[1].secret == secret


def test_a_secret_file_name_must_be_a_string(tmp_path: Path) -> None:
    assert errors_of({"accounts": [{"id": 1, "secret_file": 123}]}, tmp_path) == [
        "accounts[0].secret_file: must be a string, not a number: quote it, "
        'e.g. secret_file: "/run/secrets/mcn"'
    ]


def test_accounts_on_the_example_secret_are_named() -> None:
    config = parse_config(
        {
            "accounts": [
                {"id": 1, "secret": "SecretToken"},
                {"id": 2, "secret": "own"},
                {"id": 3, "secret": "SecretToken"},
            ]
        }
    )
    assert example_secret_accounts(config) == [1, 3]


def test_with_no_config_anywhere_it_says_where_it_looked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MCN_EXPORTER_CONFIG", raising=False)
    with pytest.raises(ConfigError) as caught:
        locate_config(None)
    assert caught.value.errors == [
        "no config file: none given, $MCN_EXPORTER_CONFIG is not set and there is no "
        f"config.yaml in {tmp_path}",
        "point at one with --config PATH or MCN_EXPORTER_CONFIG=PATH "
        "(config.example.yaml shows every key)",
    ]
    (tmp_path / "config.yaml").write_text("")
    assert locate_config(None) == Path("config.yaml")
    assert locate_config("elsewhere.yaml") == Path("elsewhere.yaml")


def test_config_path_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCN_EXPORTER_CONFIG", "/etc/from-env.yaml")
    assert find_config_path("given.yaml") == Path("given.yaml")
    assert find_config_path(None) == Path("/etc/from-env.yaml")
    monkeypatch.delenv("MCN_EXPORTER_CONFIG")
    assert find_config_path(None) == Path("config.yaml")


def test_durations_in_seconds_or_with_units() -> None:
    for raw, seconds in (("4h", 14400), ("90m", 5400), ("1h30m", 5400), ("45s", 45), (30, 30)):
        config: Config = parse_config({**MINIMAL, "calls": {"max_duration": raw}})
        assert config.calls.max_duration == seconds


def test_trusted_proxies_are_addresses_or_networks(tmp_path: Path) -> None:
    document = {"accounts": [{"id": 1, "secret": "s"}]}
    config = parse_config({**document, "server": {"trusted_proxies": ["127.0.0.1", "10.0.0.0/8"]}})
    assert [str(n) for n in config.server.trusted_proxies] == ["127.0.0.1/32", "10.0.0.0/8"]
    assert parse_config(document).server.trusted_proxies == ()
    bad = {**document, "server": {"trusted_proxies": ["127.0.0.1", "nginx"]}}
    assert errors_of(bad) == [
        "server.trusted_proxies[1]: must be an IP address or network, not 'nginx'"
    ]
    assert errors_of({**document, "server": {"trusted_proxies": "127.0.0.1"}}) == [
        "server.trusted_proxies: must be a list of addresses or networks, not a string"
    ]


# -- the PostgreSQL store ----------------------------------------------------------------------


def store_of(store: dict[str, Any], base_dir: Path = Path()) -> StoreConfig:
    return parse_config({**MINIMAL, "store": store}, base_dir).store


def test_without_a_url_the_store_is_the_sqlite_file_as_before() -> None:
    store = parse_config(MINIMAL).store
    assert store == StoreConfig(path="./data/mcn-exporter.sqlite3")
    assert store.url is None
    assert store.describe() == "./data/mcn-exporter.sqlite3"


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://mcn@db.example:5432/mcn",
        "postgres://mcn@db.example/mcn?sslmode=require",
        "postgresql:///mcn?host=/var/run/postgresql",
        "postgresql://mcn@db1.example:5432,db2.example:5432/mcn?target_session_attrs=read-write",
        "host=db.example port=5432 dbname=mcn user=mcn",
        "host=db.example dbname=mcn application_name='mcn exporter'",
    ],
)
def test_a_postgresql_url_or_conninfo_is_taken_as_written(url: str) -> None:
    store = store_of({"url": url})
    assert store.url == url
    assert store.password is None


def test_the_url_may_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCN_TEST_DB_PASSWORD", "s3cret")
    store = store_of({"url": "postgresql://mcn:${MCN_TEST_DB_PASSWORD}@db.example/mcn"})
    assert store.url == "postgresql://mcn:s3cret@db.example/mcn"
    assert store.describe() == "postgresql://mcn:****@db.example/mcn"


def test_the_password_file_sets_the_password_without_a_line_end(tmp_path: Path) -> None:
    (tmp_path / "db-password").write_text("pa ss=word\n")
    store = store_of({"url": "postgresql://mcn@db/mcn", "password_file": "db-password"}, tmp_path)
    assert store.password == "pa ss=word"
    assert store.describe() == "postgresql://mcn@db/mcn"


def test_no_password_shows_in_the_repr_nor_in_the_description(tmp_path: Path) -> None:
    (tmp_path / "db-password").write_text("from-the-file")
    with_file = store_of({"url": "host=db dbname=mcn", "password_file": "db-password"}, tmp_path)
    in_url = store_of({"url": "postgresql://mcn:in-the-url@db/mcn"})
    in_query = store_of({"url": "postgresql://mcn@db/mcn?sslmode=require&password=in-the-query"})
    in_conninfo = store_of({"url": "host=db password='in conninfo' dbname=mcn"})
    for store, password in [
        (with_file, "from-the-file"),
        (in_url, "in-the-url"),
        (in_query, "in-the-query"),
        (in_conninfo, "in conninfo"),
    ]:
        assert password not in repr(store)
        assert password not in repr(parse_config({**MINIMAL, "store": {"url": store.url}}))
        assert password not in store.describe()
    assert in_query.describe() == "postgresql://mcn@db/mcn?sslmode=require&password=****"
    assert in_conninfo.describe() == "host=db password=**** dbname=mcn"


def test_a_password_with_an_at_sign_is_masked_whole() -> None:
    assert mask_password("postgresql://mcn:p@ss:w@rd@db/mcn") == "postgresql://mcn:****@db/mcn"


@pytest.mark.parametrize(
    ("store", "error"),
    [
        (
            {"path": "/var/lib/mcn.sqlite3", "url": "postgresql://mcn@db/mcn"},
            "store.url: give either store.path (SQLite) or store.url (PostgreSQL), not both",
        ),
        ({"url": ""}, "store.url: must be a postgresql:// URL or a libpq key=value string"),
        ({"url": "mysql://db/mcn"}, "store.url: must be a postgresql:// URL"),
        ({"url": "db.example:5432"}, "store.url: must be a postgresql:// URL"),
        ({"url": 5432}, "store.url: must be a string, not a number"),
        ({"password_file": "pw"}, "store.password_file: only with store.url"),
        (
            {"url": "postgresql://mcn@db/mcn", "password_file": "nope"},
            "store.password_file: cannot read nope",
        ),
        ({"url": "postgresql://mcn@db/mcn", "pasword_file": "x"}, "store.pasword_file: unknown"),
    ],
)
def test_store_errors_name_their_key_path(store: dict[str, Any], error: str) -> None:
    errors = errors_of({**MINIMAL, "store": store})
    assert any(line.startswith(error) for line in errors), errors


def test_a_url_error_does_not_show_the_password() -> None:
    errors = errors_of({**MINIMAL, "store": {"url": "mysql://mcn:hunter2@db/mcn"}})
    assert errors == [
        "store.url: must be a postgresql:// URL or a libpq key=value string such as "
        "'host=db.example dbname=mcn', not 'mysql://mcn:****@db/mcn'"
    ]


def test_a_password_in_the_url_and_a_password_file_are_one_too_many(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("other")
    errors = errors_of(
        {**MINIMAL, "store": {"url": "postgresql://mcn:one@db/mcn", "password_file": "pw"}},
        tmp_path,
    )
    assert errors == ["store.password_file: store.url holds a password already"]
