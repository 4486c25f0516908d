"""Configuration: YAML parsed once into frozen dataclasses, every error named by its key path."""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

import yaml

# The module, not its names: hours.py imports this module in turn, and whichever of the two is
# imported first sees the other half-built.
from exporter import hours as opening_hours
from exporter.events import EXTENSION_PATTERN
from exporter.numbers import DEFAULT_MATCH_DIGITS, OTHER_LINE, Lines, number_key

DEFAULT_RING_BUCKETS = (1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0)
DEFAULT_TALK_BUCKETS = (5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0)
CONFIG_ENV_VAR = "MCN_EXPORTER_CONFIG"
RESERVED_PATHS = frozenset({"/", "/metrics", "/healthz", "/readyz"})
RESERVED_INFO_LABELS = frozenset({"account", "extension", "name"})
LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
DURATION = re.compile(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")
LOG_LEVELS = ("debug", "info", "warning", "error")
POSTGRESQL_URL = re.compile(r"postgres(?:ql)?://", re.IGNORECASE)
# libpq's other form: keyword=value pairs, values bare or in single quotes.
CONNINFO = re.compile(r"\s*(?:[a-z_]+\s*=\s*(?:'(?:[^'\\]|\\.)*'|[^\s']+)\s*)+", re.IGNORECASE)
# Up to the last @ before the path: libpq's reading of a password that holds an @ unescaped.
URL_PASSWORD = re.compile(r"(://[^:@/?#]*:)[^/?#]*(?=@)")
QUERY_PASSWORD = re.compile(r"([?&]password=)[^&#]*", re.IGNORECASE)
CONNINFO_PASSWORD = re.compile(r"(\bpassword\s*=\s*)(?:'(?:[^'\\]|\\.)*'|[^\s']+)", re.IGNORECASE)
# The provider's documentation uses this secret in every example: anyone can post with it.
EXAMPLE_SECRET = "SecretToken"
MAX_LINE_NAME = 64


@dataclass(frozen=True)
class ServerConfig:
    bind: str = "0.0.0.0:9880"
    workers: int = 2
    threads: int = 4
    max_body_bytes: int = 64 * 1024
    webhook_path: str = "/webhook"
    timeout: float = 30.0
    # A connection that has not delivered a whole request by then is closed.
    client_timeout: float = 10.0
    # Reverse proxies whose X-Forwarded-For names the client in log lines (none by default).
    trusted_proxies: tuple[IPNetwork, ...] = ()


@dataclass(frozen=True)
class AccountConfig:
    id: int
    secret: str = field(repr=False)
    name: str = ""
    # Its own `hours`, else the top-level one; None when neither is given.
    hours: opening_hours.Calendar | None = None
    # The company's own numbers (`did_mcn`) as written, to their names: the `line` label.
    lines: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def calendar(self) -> opening_hours.Calendar:
        """When the account is open; without hours, at every instant."""
        return opening_hours.ALWAYS_OPEN if self.hours is None else self.hours


@dataclass(frozen=True)
class ExtensionConfig:
    number: str
    name: str
    labels: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class CallsConfig:
    max_duration: float = 4 * 3600.0
    duplicate_window: float = 60.0


@dataclass(frozen=True)
class CallersConfig:
    group_window: float = 10.0
    settle: float = 30.0


@dataclass(frozen=True)
class CallbacksConfig:
    give_up_after: float = 72 * 3600.0
    match_digits: int = DEFAULT_MATCH_DIGITS


@dataclass(frozen=True)
class StoreConfig:
    """SQLite at `path`, unless `url` names a PostgreSQL database (shared by replicas)."""

    path: str = "./data/mcn-exporter.sqlite3"
    url: str | None = field(default=None, repr=False)  # may hold a password
    password: str | None = field(default=None, repr=False)  # from store.password_file

    def describe(self) -> str:
        """The store for logs and messages: the SQLite path, or the URL without its password."""
        return self.path if self.url is None else mask_password(self.url)


@dataclass(frozen=True)
class MetricsConfig:
    ring_buckets: tuple[float, ...] = DEFAULT_RING_BUCKETS
    talk_buckets: tuple[float, ...] = DEFAULT_TALK_BUCKETS
    histogram_extension_label: bool = False


@dataclass(frozen=True)
class LimitsConfig:
    max_extensions: int = 1000


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "info"
    json: bool = False


@dataclass(frozen=True)
class Config:
    accounts: Mapping[int, AccountConfig]
    extensions: Mapping[int, Mapping[str, ExtensionConfig]] = field(
        default_factory=lambda: MappingProxyType({})
    )
    server: ServerConfig = ServerConfig()
    calls: CallsConfig = CallsConfig()
    callers: CallersConfig = CallersConfig()
    callbacks: CallbacksConfig = CallbacksConfig()
    store: StoreConfig = StoreConfig()
    metrics: MetricsConfig = MetricsConfig()
    limits: LimitsConfig = LimitsConfig()
    logging: LoggingConfig = LoggingConfig()
    # The top-level `hours`: the default of every account (each account has its own resolved).
    hours: opening_hours.Calendar | None = None

    def secrets(self) -> dict[int, str]:
        return {account.id: account.secret for account in self.accounts.values()}

    def calendar(self, account_id: int) -> opening_hours.Calendar:
        """The opening hours of a configured account (always open without `hours`)."""
        return self.accounts[account_id].calendar

    def lines(self) -> dict[int, Lines]:
        """Every configured account's lines (empty when it names none), matched as configured."""
        digits = self.callbacks.match_digits
        return {
            account.id: Lines.from_config(account.lines, digits)
            for account in self.accounts.values()
        }


class ConfigError(Exception):
    """The configuration is unusable; `errors` holds one `path: problem` line per fault."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


def find_config_path(explicit: str | None) -> Path:
    """`--config`, then $MCN_EXPORTER_CONFIG, then ./config.yaml."""
    return Path(explicit or os.environ.get(CONFIG_ENV_VAR) or "config.yaml")


def locate_config(explicit: str | None) -> Path:
    """As find_config_path, but when nothing names a file and ./config.yaml does not exist,
    an error that says where it looked and how to point at one."""
    path = find_config_path(explicit)
    if explicit or os.environ.get(CONFIG_ENV_VAR) or path.exists():
        return path
    raise ConfigError(
        [
            f"no config file: none given, ${CONFIG_ENV_VAR} is not set and there is no "
            f"config.yaml in {Path.cwd()}",
            f"point at one with --config PATH or {CONFIG_ENV_VAR}=PATH "
            "(config.example.yaml shows every key)",
        ]
    )


def load_config(path: Path | str) -> Config:
    """The file parsed and checked; every error is prefixed with the file's name."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text"]) from exc
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([_yaml_error(path, exc)]) from exc
    try:
        return parse_config(document, base_dir=path.parent)
    except ConfigError as exc:
        raise ConfigError([f"{path}: {error}" for error in exc.errors]) from None


def _yaml_error(path: Path, exc: yaml.YAMLError) -> str:
    """`file:line:column: problem`, as editors and compilers print it."""
    if not isinstance(exc, yaml.MarkedYAMLError) or exc.problem_mark is None:
        return f"{path}: not valid YAML: {exc}"
    mark = exc.problem_mark
    context = f" ({exc.context})" if exc.context else ""
    return f"{path}:{mark.line + 1}:{mark.column + 1}: not valid YAML: {exc.problem}{context}"


def example_secret_accounts(config: Config) -> list[int]:
    """The accounts whose secret is still the provider's documentation example."""
    return [account.id for account in config.accounts.values() if account.secret == EXAMPLE_SECRET]


def parse_config(document: object, base_dir: Path = Path()) -> Config:
    reader = _Reader(base_dir)
    config = reader.config(document)
    if reader.errors or config is None:
        raise ConfigError(reader.errors or ["(root): empty configuration"])
    return config


T = TypeVar("T")
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class _Reader:
    """Walks the YAML document, collecting every error instead of stopping at the first."""

    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir
        self.errors: list[str] = []

    def error(self, path: str, problem: str) -> None:
        self.errors.append(f"{path}: {problem}")

    # -- sections ------------------------------------------------------------------------------

    def config(self, doc: object) -> Config | None:
        section = self.mapping(doc, "(root)")
        if section is None:
            return None
        self.no_unknown_keys(
            section,
            "",
            {
                "server",
                "accounts",
                "hours",
                "extensions",
                "calls",
                "callers",
                "callbacks",
                "store",
                "metrics",
                "limits",
                "logging",
            },
        )
        default_hours = self.hours(section.get("hours"), "hours")
        callbacks = self.callbacks(section.get("callbacks"))
        accounts = self.accounts(section.get("accounts"), default_hours, callbacks.match_digits)
        limits = self.limits(section.get("limits"))
        return Config(
            server=self.server(section.get("server")),
            accounts=MappingProxyType(accounts),
            extensions=MappingProxyType(
                self.extensions(section.get("extensions"), accounts, limits)
            ),
            calls=self.calls(section.get("calls")),
            callers=self.callers(section.get("callers")),
            callbacks=callbacks,
            store=self.store(section.get("store")),
            metrics=self.metrics(section.get("metrics")),
            limits=limits,
            logging=self.logging(section.get("logging")),
            hours=default_hours,
        )

    def server(self, doc: object) -> ServerConfig:
        default = ServerConfig()
        section = self.section(doc, "server", set(vars(default)))
        bind = self.value(section, "server.bind", str, default.bind)
        if not _valid_bind(bind):
            self.error(
                "server.bind", f"must be HOST:PORT with a port from 1 to 65535, not {bind!r}"
            )
        path = self.value(section, "server.webhook_path", str, default.webhook_path)
        if not path.startswith("/") or path in RESERVED_PATHS:
            self.error(
                "server.webhook_path",
                f"must start with / and not be one of {sorted(RESERVED_PATHS)}, not {path!r}",
            )
        return ServerConfig(
            bind=bind,
            workers=self.integer(section, "server.workers", default.workers, 1, 64),
            threads=self.integer(section, "server.threads", default.threads, 1, 256),
            max_body_bytes=self.integer(
                section, "server.max_body_bytes", default.max_body_bytes, 256, 16 * 1024 * 1024
            ),
            webhook_path=path,
            timeout=self.duration(section, "server.timeout", default.timeout),
            client_timeout=self.duration(section, "server.client_timeout", default.client_timeout),
            trusted_proxies=self.networks(section, "server.trusted_proxies"),
        )

    def networks(self, section: dict[str, Any], path: str) -> tuple[IPNetwork, ...]:
        raw = self.expand(section.get(path.rsplit(".", 1)[-1]), path)
        if raw is None:
            return ()
        if not isinstance(raw, list):
            self.error(path, f"must be a list of addresses or networks, not {_kind(raw)}")
            return ()
        networks = []
        for index, item in enumerate(raw):
            try:
                networks.append(ipaddress.ip_network(str(self.expand(item, path)), strict=False))
            except ValueError:
                self.error(f"{path}[{index}]", f"must be an IP address or network, not {item!r}")
        return tuple(networks)

    def accounts(
        self, doc: object, default_hours: opening_hours.Calendar | None, match_digits: int
    ) -> dict[int, AccountConfig]:
        if doc is None:
            self.error("accounts", "required: list at least one account (id and secret)")
            return {}
        if not isinstance(doc, list) or not doc:
            self.error("accounts", "must be a non-empty list of accounts")
            return {}
        accounts: dict[int, AccountConfig] = {}
        for index, item in enumerate(doc):
            path = f"accounts[{index}]"
            section = self.section(
                item, path, {"id", "secret", "secret_file", "name", "hours", "lines"}
            )
            account_id = self.account_id(section.get("id"), f"{path}.id")
            secret = self.secret(section, path)
            name = self.value(section, f"{path}.name", str, "")
            # An account's own hours replace the default whole, not key by key.
            own_hours = self.hours(section.get("hours"), f"{path}.hours")
            lines = self.lines(section.get("lines"), f"{path}.lines", match_digits)
            if account_id is None or secret is None:
                continue
            if account_id in accounts:
                self.error(f"{path}.id", f"account {account_id} is listed twice")
                continue
            account_hours = default_hours if own_hours is None else own_hours
            accounts[account_id] = AccountConfig(
                id=account_id, secret=secret, name=name, hours=account_hours, lines=lines
            )
        return accounts

    def lines(self, doc: object, path: str, match_digits: int) -> Mapping[str, str]:
        """`lines`: the company's numbers to their names, which become `line` label values."""
        if doc is None:
            return MappingProxyType({})
        section = self.mapping(doc, path) or {}
        names: dict[str, str] = {}
        seen: dict[str, str] = {}  # the digits a number matches by -> the number as written
        for raw_number, raw_name in section.items():
            number = str(raw_number)
            entry = f"{path}.{number}"
            key = number_key(number, match_digits)
            if isinstance(raw_number, bool) or key is None:
                self.error(entry, "a company number needs at least one digit")
                continue
            if key in seen:
                self.error(
                    entry,
                    f"matches the same number as {seen[key]} (their last {match_digits} digits, "
                    "callbacks.match_digits, are the same)",
                )
                continue
            name = self.line_name(raw_name, entry)
            if name is not None:
                seen[key] = number
                names[number] = name
        return MappingProxyType(names)

    def line_name(self, raw: object, path: str) -> str | None:
        name = self.expand(raw, path)
        if not isinstance(name, str):
            self.error(path, f"must be the line's name, a string, not {_kind(name)}")
            return None
        if not name.strip():
            self.error(path, "the line's name must not be empty")
            return None
        if name == OTHER_LINE:
            self.error(path, f"{OTHER_LINE!r} is the line of unconfigured numbers: pick another")
            return None
        if len(name) > MAX_LINE_NAME or not name.isprintable():
            self.error(path, f"must be at most {MAX_LINE_NAME} printable characters, not {name!r}")
            return None
        return name

    def hours(self, doc: object, path: str) -> opening_hours.Calendar | None:
        """An `hours:` block as a calendar; None when absent (or broken: its errors are kept)."""
        if doc is None:
            return None
        try:
            return opening_hours.parse_hours(doc, path)
        except ConfigError as exc:
            self.errors.extend(exc.errors)
            return None

    def account_id(self, raw: object, path: str) -> int | None:
        value = self.expand(raw, path)
        if value is None:
            self.error(path, "required")
            return None
        if isinstance(value, str) and value.isascii() and value.isdigit():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 10**18:
            self.error(path, f"must be a positive integer, not {value!r}")
            return None
        return value

    def secret(self, section: dict[str, Any], path: str) -> str | None:
        has_secret = section.get("secret") is not None
        has_file = section.get("secret_file") is not None
        if has_secret and has_file:
            self.error(f"{path}.secret", "give either secret or secret_file, not both")
            return None
        if has_file:
            return self.secret_from_file(section.get("secret_file"), f"{path}.secret_file")
        if not has_secret:
            self.error(f"{path}.secret", "required (or secret_file)")
            return None
        secret = self.text(section.get("secret"), f"{path}.secret", 'secret: "0123"')
        if secret is None:
            return None
        if not secret.strip():
            self.error(f"{path}.secret", "must not be empty")
            return None
        return secret

    def secret_from_file(self, raw: object, path: str) -> str | None:
        file_name = self.text(raw, path, 'secret_file: "/run/secrets/mcn"')
        if file_name is None:
            return None
        try:
            content = (self.base_dir / file_name).read_text(encoding="utf-8")
        except OSError as exc:
            self.error(path, f"cannot read {file_name}: {exc.strerror}")
            return None
        except UnicodeDecodeError:
            self.error(path, f"{file_name} is not UTF-8 text")
            return None
        # Only the line end an editor or `echo` adds: any other character is part of the secret.
        secret = content.removesuffix("\n").removesuffix("\r")
        if not secret.strip():
            self.error(path, f"{file_name} is empty")
            return None
        return secret

    def extensions(
        self, doc: object, accounts: Mapping[int, AccountConfig], limits: LimitsConfig
    ) -> dict[int, Mapping[str, ExtensionConfig]]:
        if doc is None:
            return {}
        section = self.mapping(doc, "extensions")
        result: dict[int, Mapping[str, ExtensionConfig]] = {}
        for raw_account, entries in (section or {}).items():
            path = f"extensions.{raw_account}"
            account_id = self.account_id(raw_account, path)
            if account_id is None:
                continue
            if accounts and account_id not in accounts:
                self.error(path, f"account {account_id} is not in accounts")
                continue
            numbers = self.mapping(entries, path) or {}
            parsed = {}
            for raw_number, entry in numbers.items():
                extension = self.extension(str(raw_number), entry, f"{path}.{raw_number}")
                if extension is not None:
                    parsed[extension.number] = extension
            if len(parsed) > limits.max_extensions:
                self.error(
                    path,
                    f"{len(parsed)} extensions configured but limits.max_extensions is "
                    f"{limits.max_extensions}",
                )
            result[account_id] = MappingProxyType(parsed)
        return result

    def extension(self, number: str, entry: object, path: str) -> ExtensionConfig | None:
        if not EXTENSION_PATTERN.fullmatch(number):
            self.error(path, "an extension is 1 to 32 characters of 0-9 A-Z a-z * # + _ -")
            return None
        if isinstance(entry, str) or entry is None:
            return ExtensionConfig(number=number, name=self.expand(entry, path) or "")
        section = self.section(entry, path, {"name", "labels"})
        name = self.value(section, f"{path}.name", str, "")
        labels_doc = section.get("labels")
        labels: dict[str, str] = {}
        if labels_doc is not None:
            for label, value in (self.mapping(labels_doc, f"{path}.labels") or {}).items():
                label_path = f"{path}.labels.{label}"
                if not isinstance(label, str) or not LABEL_NAME.fullmatch(label):
                    self.error(label_path, "not a valid Prometheus label name")
                elif label.startswith("__") or label in RESERVED_INFO_LABELS:
                    self.error(label_path, "reserved label name")
                else:
                    expanded = self.expand(value, label_path)
                    if isinstance(expanded, bool) or not isinstance(expanded, str | int | float):
                        self.error(label_path, "must be a string")
                    else:
                        labels[label] = str(expanded)
        return ExtensionConfig(number=number, name=name, labels=MappingProxyType(labels))

    def calls(self, doc: object) -> CallsConfig:
        default = CallsConfig()
        section = self.section(doc, "calls", set(vars(default)))
        return CallsConfig(
            max_duration=self.duration(section, "calls.max_duration", default.max_duration),
            duplicate_window=self.duration(
                section, "calls.duplicate_window", default.duplicate_window
            ),
        )

    def callers(self, doc: object) -> CallersConfig:
        default = CallersConfig()
        section = self.section(doc, "callers", set(vars(default)))
        window = self.duration(section, "callers.group_window", default.group_window)
        settle = self.duration(section, "callers.settle", default.settle)
        if window > settle:
            self.error(
                "callers.group_window",
                f"must not be longer than callers.settle ({settle:g}s), not {window:g}s: a call "
                "would settle while its next leg could still join it",
            )
        return CallersConfig(group_window=window, settle=settle)

    def callbacks(self, doc: object) -> CallbacksConfig:
        default = CallbacksConfig()
        section = self.section(doc, "callbacks", set(vars(default)))
        return CallbacksConfig(
            give_up_after=self.duration(section, "callbacks.give_up_after", default.give_up_after),
            match_digits=self.integer(
                section, "callbacks.match_digits", default.match_digits, 4, 15
            ),
        )

    def store(self, doc: object) -> StoreConfig:
        section = self.section(doc, "store", {"path", "url", "password_file"})
        if section.get("url") is None:
            if section.get("password_file") is not None:
                self.error("store.password_file", "only with store.url (a PostgreSQL store)")
            path = self.value(section, "store.path", str, StoreConfig().path)
            if not path:
                self.error("store.path", "must not be empty")
            return StoreConfig(path=path)
        if section.get("path") is not None:
            self.error(
                "store.url",
                "give either store.path (SQLite) or store.url (PostgreSQL), not both",
            )
        url = self.postgresql_url(section.get("url"))
        password = None
        if section.get("password_file") is not None:
            password = self.secret_from_file(section["password_file"], "store.password_file")
            if url is not None and _has_password(url):
                self.error("store.password_file", "store.url holds a password already")
        return StoreConfig(url=url, password=password)

    def postgresql_url(self, raw: object) -> str | None:
        url = self.text(raw, "store.url", 'url: "postgresql://mcn@db.example:5432/mcn"')
        if url is None:
            return None
        url = url.strip()
        if POSTGRESQL_URL.match(url):
            return url
        if CONNINFO.fullmatch(url):
            return url
        self.error(
            "store.url",
            "must be a postgresql:// URL or a libpq key=value string such as "
            f"'host=db.example dbname=mcn', not {mask_password(url)!r}",
        )
        return None

    def metrics(self, doc: object) -> MetricsConfig:
        default = MetricsConfig()
        section = self.section(doc, "metrics", set(vars(default)))
        return MetricsConfig(
            ring_buckets=self.buckets(section, "metrics.ring_buckets", default.ring_buckets),
            talk_buckets=self.buckets(section, "metrics.talk_buckets", default.talk_buckets),
            histogram_extension_label=self.value(
                section, "metrics.histogram_extension_label", bool, False
            ),
        )

    def limits(self, doc: object) -> LimitsConfig:
        section = self.section(doc, "limits", {"max_extensions"})
        return LimitsConfig(
            max_extensions=self.integer(
                section, "limits.max_extensions", LimitsConfig().max_extensions, 1, 1_000_000
            )
        )

    def logging(self, doc: object) -> LoggingConfig:
        section = self.section(doc, "logging", {"level", "json"})
        level = self.value(section, "logging.level", str, "info").lower()
        if level not in LOG_LEVELS:
            self.error("logging.level", f"must be one of {', '.join(LOG_LEVELS)}, not {level!r}")
        return LoggingConfig(level=level, json=self.value(section, "logging.json", bool, False))

    # -- values --------------------------------------------------------------------------------

    def mapping(self, doc: object, path: str) -> dict[Any, Any] | None:
        if not isinstance(doc, dict):
            self.error(path, f"must be a mapping, not {_kind(doc)}")
            return None
        return doc

    def section(self, doc: object, path: str, allowed: set[str]) -> dict[str, Any]:
        if doc is None:
            return {}
        section = self.mapping(doc, path)
        if section is None:
            return {}
        self.no_unknown_keys(section, path + ".", allowed)
        return section

    def no_unknown_keys(self, section: dict[Any, Any], prefix: str, allowed: set[str]) -> None:
        for key in section:
            if key not in allowed:
                self.error(f"{prefix}{key}", f"unknown key (expected one of {sorted(allowed)})")

    def expand(self, raw: object, path: str) -> Any:
        """Replace ${VAR} and ${VAR:-default} in a string value."""
        if not isinstance(raw, str) or "${" not in raw:
            return raw

        def substitute(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            value = os.environ.get(name)
            if value is None:
                if default is None:
                    self.error(path, f"environment variable {name} is not set")
                    return ""
                return default
            return value

        return ENV_REFERENCE.sub(substitute, raw)

    def text(self, raw: object, path: str, example: str) -> str | None:
        """A value that must be written as a string in the YAML.

        YAML turns unquoted 0123 into 83 and 12.50 into 12.5: converting such a number back to
        text would silently give another secret, so the value must be quoted instead.
        """
        if not isinstance(raw, str):
            self.error(path, f"must be a string, not {_kind(raw)}: quote it, e.g. {example}")
            return None
        errors_before = len(self.errors)
        text: str = self.expand(raw, path)
        return None if len(self.errors) > errors_before else text

    def value(self, section: dict[str, Any], path: str, kind: type[T], default: T) -> T:
        raw = self.expand(section.get(path.rsplit(".", 1)[-1]), path)
        if raw is None:
            return default
        if kind is bool and isinstance(raw, str) and raw.lower() in ("true", "false"):
            raw = raw.lower() == "true"
        if kind is str and isinstance(raw, int | float) and not isinstance(raw, bool):
            raw = str(raw)
        if not isinstance(raw, kind):
            self.error(path, f"must be a {kind.__name__}, not {_kind(raw)}")
            return default
        return raw

    def integer(self, section: dict[str, Any], path: str, default: int, low: int, high: int) -> int:
        raw = self.expand(section.get(path.rsplit(".", 1)[-1]), path)
        if raw is None:
            return default
        if isinstance(raw, str) and raw.strip().isascii() and raw.strip().isdigit():
            raw = int(raw)
        if not isinstance(raw, int) or isinstance(raw, bool) or not low <= raw <= high:
            self.error(path, f"must be an integer from {low} to {high}, not {raw!r}")
            return default
        return raw

    def duration(self, section: dict[str, Any], path: str, default: float) -> float:
        raw = self.expand(section.get(path.rsplit(".", 1)[-1]), path)
        if raw is None:
            return default
        seconds = _parse_duration(raw)
        if seconds is None or not 0 < seconds < math.inf:
            self.error(path, f"must be a positive duration such as 30s, 15m or 4h, not {raw!r}")
            return default
        return seconds

    def buckets(
        self, section: dict[str, Any], path: str, default: tuple[float, ...]
    ) -> tuple[float, ...]:
        raw = section.get(path.rsplit(".", 1)[-1])
        if raw is None:
            return default
        if not isinstance(raw, list) or not raw:
            self.error(path, "must be a non-empty list of seconds")
            return default
        errors_before = len(self.errors)
        bounds: list[float] = []
        for index, item in enumerate(raw):
            bound = self.bucket_bound(item, f"{path}[{index}]", bounds[-1] if bounds else 0.0)
            if bound is not None:
                bounds.append(bound)
        return default if len(self.errors) > errors_before else tuple(bounds)

    def bucket_bound(self, raw: object, path: str, previous: float) -> float | None:
        errors_before = len(self.errors)
        value = _number(self.expand(raw, path))
        if len(self.errors) > errors_before:
            return None
        if not _is_number(value):
            self.error(path, f"must be a number of seconds, not {value!r}")
            return None
        bound = float(value)  # type: ignore[arg-type]
        if not math.isfinite(bound) or bound <= 0:
            self.error(path, f"must be positive and finite, not {value!r}")
            return None
        if bound <= previous:
            self.error(path, f"must be above the bound before it ({previous:g}), not {value!r}")
            return None
        return bound


def mask_password(url: str) -> str:
    """A libpq URL or key=value string with its password, wherever it is, replaced by ****."""
    for pattern in (URL_PASSWORD, QUERY_PASSWORD, CONNINFO_PASSWORD):
        url = pattern.sub(r"\g<1>****", url)
    return url


def _has_password(url: str) -> bool:
    return mask_password(url) != url


def _parse_duration(raw: object) -> float | None:
    if _is_number(raw):
        return float(raw)  # type: ignore[arg-type]
    if not isinstance(raw, str) or not raw:
        return None
    text = raw.strip()
    try:
        return float(text)
    except ValueError:
        pass
    match = DURATION.fullmatch(text)
    if not match or not any(match.groups()):
        return None
    hours, minutes, seconds = (int(part or 0) for part in match.groups())
    return float(hours * 3600 + minutes * 60 + seconds)


def _number(value: object) -> object:
    """A bound given as text (from ${VAR}) as its number; anything else as it is."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _valid_bind(bind: str) -> bool:
    host, sep, port = bind.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536)


def _kind(value: object) -> str:
    names: dict[type, str] = {
        dict: "a mapping",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
    }
    if value is None:
        return "empty"
    return names.get(type(value), f"a {type(value).__name__}")
