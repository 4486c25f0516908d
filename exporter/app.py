"""The HTTP layer (SPEC §4): thin Falcon resources that parse, call the core and answer."""

from __future__ import annotations

import html
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import falcon

from exporter import __version__
from exporter.calls import CallTracker, Clock, TrackerSettings
from exporter.config import Config
from exporter.events import MALFORMED, TOO_LARGE, Rejection, WebhookParser
from exporter.legs import TallyLayout
from exporter.metrics import RejectionCounter, Scrape, build_metrics, initial_rows
from exporter.store import CallStore, SqliteCallStore, StoreSeed, StoreUnavailable

log = logging.getLogger("exporter.http")

REJECTION_STATUS = {
    "malformed": falcon.HTTP_400,
    "invalid": falcon.HTTP_422,
    "unauthorized": falcon.HTTP_401,
    "unknown_account": falcon.HTTP_403,
    "too_large": falcon.HTTP_413,
}
OK_BODY = b'{"status":"ok"}'


@dataclass(frozen=True)
class Deps:
    """Everything the resources need, built once per worker."""

    config: Config
    parser: WebhookParser
    tracker: CallTracker
    store: CallStore
    rejections: RejectionCounter
    scrape: Scrape


def build_deps(
    config: Config, clock: Clock = time.time, multiprocess_dir: str | None = None
) -> Deps:
    layout = tally_layout(config)
    store = SqliteCallStore(Path(config.store.path), layout, store_seed(config, layout))
    rejections, scrape = build_metrics(store, config, multiprocess_dir)
    settings = TrackerSettings(
        max_duration=config.calls.max_duration,
        duplicate_window=config.calls.duplicate_window,
        max_extensions=config.limits.max_extensions,
    )
    return Deps(
        config=config,
        parser=WebhookParser(config.secrets()),
        tracker=CallTracker(store, settings, clock),
        store=store,
        rejections=rejections,
        scrape=scrape,
    )


def tally_layout(config: Config) -> TallyLayout:
    return TallyLayout(
        ring_buckets=config.metrics.ring_buckets,
        talk_buckets=config.metrics.talk_buckets,
        timings_by_extension=config.metrics.histogram_extension_label,
    )


def store_seed(config: Config, layout: TallyLayout) -> StoreSeed:
    """What the store starts a new file with, should its file be deleted while serving."""
    return StoreSeed(
        rows=tuple(initial_rows(config, layout)),
        extensions=tuple(
            (account, tuple(extensions)) for account, extensions in config.extensions.items()
        ),
    )


def create_app(deps: Deps) -> falcon.App[falcon.Request, falcon.Response]:
    app: falcon.App[falcon.Request, falcon.Response] = falcon.App()
    app.req_options.strip_url_path_trailing_slash = True  # /webhook/ in the portal works too
    webhook_path = deps.config.server.webhook_path
    app.add_route(webhook_path, WebhookResource(deps))
    app.add_route("/metrics", MetricsResource(deps))
    app.add_route("/healthz", HealthResource())
    app.add_route("/readyz", ReadyResource(deps.store))
    app.add_route("/", LandingResource(deps))
    app.add_error_handler(Rejection, _rejection_handler(deps.rejections))
    app.add_error_handler(StoreUnavailable, _store_unavailable_handler(deps.rejections))
    app.add_error_handler(falcon.HTTPError, _http_error_handler(deps.rejections, webhook_path))
    app.add_error_handler(Exception, _unexpected_error_handler)
    return app


class WebhookResource:
    def __init__(self, deps: Deps) -> None:
        self._parser = deps.parser
        self._tracker = deps.tracker
        self._max_body = deps.config.server.max_body_bytes

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        event = self._parser.parse(read_body(req, self._max_body))
        disposition = self._tracker.on_event(event)
        log.debug("%s %s", event, disposition.value)
        resp.data = OK_BODY
        resp.content_type = falcon.MEDIA_JSON


class MetricsResource:
    def __init__(self, deps: Deps) -> None:
        self._tracker = deps.tracker
        self._scrape = deps.scrape

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        # Expiry runs here, so the gauge a scraper reads never holds a phantom call.
        self._tracker.expire_stale()
        body, content_type, gzipped = self._scrape.render(
            req.get_header("Accept"), req.get_header("Accept-Encoding")
        )
        resp.data = body
        resp.content_type = content_type
        if gzipped:
            resp.set_header("Content-Encoding", "gzip")
        resp.vary = ("Accept", "Accept-Encoding")


class HealthResource:
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"status": "ok"}


class ReadyResource:
    def __init__(self, store: CallStore) -> None:
        self._store = store

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        self._store.ping()
        resp.media = {"status": "ok"}


class LandingResource:
    def __init__(self, deps: Deps) -> None:
        self._store = deps.store
        self._webhook_path = deps.config.server.webhook_path

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        active = sum(self._store.snapshot().active.values())
        resp.content_type = falcon.MEDIA_HTML
        resp.text = LANDING_PAGE.format(
            version=html.escape(__version__),
            active=active,
            webhook=html.escape(self._webhook_path),
        )


def read_body(req: falcon.Request, limit: int) -> bytes:
    """The raw body, refused past `limit` bytes whether or not a Content-Length was sent.

    Falcon has no size limit, and with chunked transfer its bounded stream reads as empty
    (falcon #1610), so the WSGI input is read directly, at most one byte past the limit.
    """
    try:
        declared = req.content_length
    except falcon.HTTPError as exc:
        raise Rejection(MALFORMED, "Content-Length is not a number") from exc
    if declared is not None and declared > limit:
        raise Rejection(TOO_LARGE, f"body is over {limit} bytes")
    try:
        body: bytes = req.stream.read(limit + 1)
    except Exception as exc:
        # gunicorn raises its own errors for broken chunked encoding or a truncated body.
        raise Rejection(MALFORMED, "body could not be read") from exc
    if len(body) > limit:
        raise Rejection(TOO_LARGE, f"body is over {limit} bytes")
    return body


def _rejection_handler(rejections: RejectionCounter) -> Any:
    def handle(req: falcon.Request, resp: falcon.Response, ex: Rejection, params: Any) -> None:
        rejections.count(ex.reason)
        log.warning("webhook rejected from %s: %s: %s", req.remote_addr, ex.reason, ex.message)
        resp.status = REJECTION_STATUS[ex.reason]
        resp.media = _error(ex.reason, ex.message, ex.field)
        if ex.reason == TOO_LARGE:
            resp.set_header("Connection", "close")  # do not read the rest of an oversized body

    return handle


def _store_unavailable_handler(rejections: RejectionCounter) -> Any:
    def handle(
        req: falcon.Request, resp: falcon.Response, ex: StoreUnavailable, params: Any
    ) -> None:
        if req.method == "POST":
            rejections.count("store_unavailable")
        log.error("call store unavailable: %s", ex)
        resp.status = falcon.HTTP_503
        resp.set_header("Retry-After", "5")
        resp.media = _error("store_unavailable", "call store unavailable, try again")

    return handle


def _http_error_handler(rejections: RejectionCounter, webhook_path: str) -> Any:
    def handle(
        req: falcon.Request, resp: falcon.Response, ex: falcon.HTTPError, params: Any
    ) -> None:
        reason = "method_not_allowed" if ex.status_code == 405 else "http_error"
        if reason == "method_not_allowed" and req.path == webhook_path:
            rejections.count(reason)
        resp.status = ex.status
        if ex.headers:
            resp.set_headers(ex.headers)
        resp.media = _error(reason, ex.title if ex.description is None else ex.description)

    return handle


def _unexpected_error_handler(
    req: falcon.Request, resp: falcon.Response, ex: Exception, params: Any
) -> None:
    log.exception("unexpected error on %s %s", req.method, req.path)
    resp.status = falcon.HTTP_500
    resp.media = _error("internal", "internal error")


def _error(reason: str, message: str, field: str | None = None) -> dict[str, str]:
    body = {"status": "error", "reason": reason, "error": message}
    if field:
        body["field"] = field
    return body


LANDING_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>mcn-exporter</title></head>
<body>
<h1>mcn-exporter {version}</h1>
<p>Prometheus exporter for MCN Telecom call webhooks. Active calls now: <b>{active}</b>.</p>
<ul>
<li><a href="/metrics">/metrics</a>: Prometheus metrics</li>
<li><a href="/healthz">/healthz</a>: process alive</li>
<li><a href="/readyz">/readyz</a>: events can be stored now</li>
<li><code>POST {webhook}</code>: the URL to enter in the MCN Telecom portal</li>
</ul>
</body></html>
"""
