"""The HTTP layer (README, "HTTP interface"): thin Falcon resources that parse, call the core
and answer."""

from __future__ import annotations

import html
import ipaddress
import json
import logging
from dataclasses import dataclass
from typing import Any, ClassVar, NoReturn

import falcon
from falcon.routing import map_http_methods

from exporter import __version__
from exporter.calls import CallTracker
from exporter.config import Config, IPNetwork
from exporter.events import WebhookParser
from exporter.logs import LINE_INTERVAL, ThrottledLog
from exporter.metrics import RejectionCounter, Scrape
from exporter.rejections import Reason, Rejection
from exporter.store import CallStore, StoreUnavailable

log = logging.getLogger("exporter.http")

OK_BODY = b'{"status":"ok"}\n'


@dataclass(frozen=True)
class Deps:
    """Everything the resources need, built once per worker."""

    config: Config
    parser: WebhookParser
    tracker: CallTracker
    store: CallStore
    rejections: RejectionCounter
    scrape: Scrape


def create_app(deps: Deps) -> falcon.App[falcon.Request, falcon.Response]:
    app = ExporterApp(middleware=[ServedMethods()])
    app.req_options.strip_url_path_trailing_slash = True  # /webhook/ in the portal works too
    webhook_path = deps.config.server.webhook_path
    app.add_route(webhook_path, WebhookResource(deps))
    app.add_route("/metrics", MetricsResource(deps))
    app.add_route("/healthz", HealthResource())
    app.add_route("/readyz", ReadyResource(deps.store))
    app.add_route("/", LandingResource(deps))
    refusals = Refusals(
        deps.rejections,
        webhook_path,
        ThrottledLog(log, LINE_INTERVAL),
        deps.config.server.trusted_proxies,
    )
    app.add_error_handler(Rejection, refusals.on_rejection)
    app.add_error_handler(StoreUnavailable, refusals.on_store_unavailable)
    app.add_error_handler(Refusal, refusals.on_refusal)
    app.add_error_handler(falcon.HTTPError, refusals.on_falcon_error)
    app.add_error_handler(Exception, refusals.on_unexpected)
    app.set_error_serializer(serialize_error)
    return app


class ExporterApp(falcon.App[falcon.Request, falcon.Response]):
    # Falcon answers a request line with the method WEBSOCKET with 400 before routing (the name
    # it gives WebSocket handshakes under ASGI); here it is one more method no route serves.
    _META_METHODS: ClassVar[frozenset[str]] = frozenset()


class WebhookResource:
    def __init__(self, deps: Deps) -> None:
        self._parser = deps.parser
        self._tracker = deps.tracker
        self._max_body = deps.config.server.max_body_bytes

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        event = self._parser.parse(read_body(req, self._max_body))
        disposition = self._tracker.on_event(event)
        log.debug("%s %s", event, disposition.value)
        answer_ok(resp)


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

    on_head = on_get  # Falcon sends the headers of the GET answer, without its body


class HealthResource:
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        answer_ok(resp)

    on_head = on_get  # what load balancers send


class ReadyResource:
    def __init__(self, store: CallStore) -> None:
        self._store = store

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        self._store.ping()
        answer_ok(resp)

    on_head = on_get


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

    on_head = on_get


def answer_ok(resp: falcon.Response) -> None:
    resp.data = OK_BODY
    resp.content_type = falcon.MEDIA_JSON


def read_body(req: falcon.Request, limit: int) -> bytes:
    """The raw body, refused past `limit` bytes whether or not a Content-Length was sent.

    Falcon has no size limit, and with chunked transfer its bounded stream reads as empty
    (falcon #1610), so the WSGI input is read directly, at most one byte past the limit.
    """
    try:
        declared = req.content_length
    except falcon.HTTPError as exc:
        raise Rejection(Reason.MALFORMED, "Content-Length is not a number") from exc
    if declared is not None and declared > limit:
        raise Rejection(Reason.TOO_LARGE, f"body is over {limit} bytes")
    try:
        body: bytes = req.stream.read(limit + 1)
    except Exception as exc:
        # gunicorn raises its own errors for broken chunked encoding or a truncated body.
        raise Rejection(Reason.MALFORMED, "body could not be read") from exc
    if len(body) > limit:
        raise Rejection(Reason.TOO_LARGE, f"body is over {limit} bytes")
    return body


class ServedMethods:
    """One rule for every route: a method it has no responder for gets 405 with `Allow`.

    Falcon alone would answer OPTIONS with 200, and a method it does not know with 400.
    """

    def __init__(self) -> None:
        self._served: dict[type, frozenset[str]] = {}

    def process_resource(
        self, req: falcon.Request, resp: falcon.Response, resource: object, params: dict[str, Any]
    ) -> None:
        served = self._served.get(type(resource))
        if served is None:
            served = self._served[type(resource)] = frozenset(map_http_methods(resource))
        if req.method not in served:
            allowed = ", ".join(sorted(served))
            raise Refusal(
                Reason.METHOD_NOT_ALLOWED,
                f"method not allowed here; allowed: {allowed}",
                headers={"Allow": allowed},
            )


class Refusal(falcon.HTTPError):
    """Every error answer: the status of its reason, and one JSON shape (see serialize_error)."""

    def __init__(
        self,
        reason: Reason,
        message: str,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(reason.status, title=message, headers=headers)
        self.reason = reason
        self.message = message
        self.field = field

    def body(self) -> bytes:
        document = {"status": "error", "reason": str(self.reason), "error": self.message}
        if self.field:
            document["field"] = self.field
        return json.dumps(document).encode() + b"\n"


def serialize_error(req: falcon.Request, resp: falcon.Response, error: falcon.HTTPError) -> None:
    # Every error reaches here as a Refusal (see Refusals); the fallback keeps the shape anyway.
    refusal = error if isinstance(error, Refusal) else Refusal(Reason.INTERNAL, "internal error")
    resp.data = refusal.body()
    resp.content_type = falcon.MEDIA_JSON


class Refusals:
    """Turns whatever stops a request into its Refusal; counts and logs those of the webhook.

    A refusal on the webhook route is counted in mcn_webhook_rejected_total; its log line, and
    that of an unavailable store, is throttled so that a flood of bad requests cannot flood
    the log.
    """

    def __init__(
        self,
        rejections: RejectionCounter,
        webhook_path: str,
        lines: ThrottledLog,
        trusted_proxies: tuple[IPNetwork, ...] = (),
    ) -> None:
        self._rejections = rejections
        self._webhook_path = webhook_path
        self._lines = lines
        self._trusted_proxies = trusted_proxies

    def on_rejection(
        self, req: falcon.Request, resp: falcon.Response, ex: Rejection, params: dict[str, Any]
    ) -> NoReturn:
        # An oversized body is never read: the worker hands on its head alone, marked to close.
        self._refuse(req, Refusal(ex.reason, ex.message, ex.field), ex.message)

    def on_store_unavailable(
        self,
        req: falcon.Request,
        resp: falcon.Response,
        ex: StoreUnavailable,
        params: dict[str, Any],
    ) -> NoReturn:
        refusal = Refusal(
            Reason.STORE_UNAVAILABLE,
            "call store unavailable, try again",
            headers={"Retry-After": "5"},
        )
        self._refuse(req, refusal, str(ex))

    def on_refusal(
        self, req: falcon.Request, resp: falcon.Response, ex: Refusal, params: dict[str, Any]
    ) -> NoReturn:
        self._refuse(req, ex, ex.message)

    def on_falcon_error(
        self,
        req: falcon.Request,
        resp: falcon.Response,
        ex: falcon.HTTPError,
        params: dict[str, Any],
    ) -> NoReturn:
        # What Falcon raises itself: no route for the path, or (in principle) a request it
        # cannot read.
        if ex.status_code == 404:
            refusal = Refusal(Reason.NOT_FOUND, "no such path; the endpoints are listed at /")
        else:
            refusal = Refusal(Reason.MALFORMED, ex.description or ex.title)
        self._refuse(req, refusal, refusal.message)

    def on_unexpected(
        self, req: falcon.Request, resp: falcon.Response, ex: Exception, params: dict[str, Any]
    ) -> NoReturn:
        log.exception("unexpected error on %s %s", req.method, req.path)
        raise Refusal(Reason.INTERNAL, "internal error")

    def _refuse(self, req: falcon.Request, refusal: Refusal, detail: str) -> NoReturn:
        """Counts and logs `refusal`, then raises it for Falcon to answer."""
        reason = refusal.reason
        # The route's template, not req.path: Falcon routes "//webhook" here too.
        on_webhook = req.uri_template == self._webhook_path
        if on_webhook and reason.counted:
            self._rejections.count(reason)
        if reason is Reason.STORE_UNAVAILABLE:
            self._lines.log(
                logging.ERROR,
                "call store unavailable",
                f"on {req.method} {req.uri_template}: {detail}",
            )
        elif on_webhook and reason.counted:
            self._lines.log(
                logging.WARNING,
                f"webhook rejected: {reason}",
                f"from {self._client(req)}: {detail}",
            )
        raise refusal

    def _client(self, req: falcon.Request) -> str:
        return client_address(
            req.remote_addr, req.get_header("X-Forwarded-For"), self._trusted_proxies
        )


def client_address(remote: str, forwarded_for: str | None, trusted: tuple[IPNetwork, ...]) -> str:
    """Who sent the request: behind trusted proxies, the last address they did not add.

    X-Forwarded-For is appended to by each proxy, and anyone can send one: only the entries
    added by proxies we trust are believed, read from the right.
    """
    hops = [remote, *reversed([hop.strip() for hop in (forwarded_for or "").split(",")])]
    for hop in hops:
        if not hop or not _is_trusted(hop, trusted):
            return hop or remote
    return hops[-1]


def _is_trusted(address: str, trusted: tuple[IPNetwork, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in trusted)


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
