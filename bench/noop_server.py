"""The ceiling: a no-op Falcon webhook under the exporter's own gunicorn configuration.

    python bench/noop_server.py --config CONFIG --bind 127.0.0.1:PORT [--workers N]

POST /webhook reads the body (at most server.max_body_bytes + 1 bytes, as the exporter does) and
answers 200 {"status":"ok"}; GET /healthz answers too. The gunicorn options come from
`exporter.server.gunicorn_options`, so worker class, threads, keep-alive and timeouts are the
exporter's, whatever they become. Nothing else of the exporter runs: no parsing, no store, no
prometheus_client.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import falcon
from gunicorn.app.base import BaseApplication

from exporter.config import load_config
from exporter.server import gunicorn_options

OK_BODY = b'{"status":"ok"}\n'  # as the exporter answers


class NoopWebhook:
    def __init__(self, max_body: int) -> None:
        self._max_body = max_body

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.stream.read(self._max_body + 1)
        resp.data = OK_BODY
        resp.content_type = falcon.MEDIA_JSON

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.data = OK_BODY
        resp.content_type = falcon.MEDIA_JSON


def create_app(webhook_path: str, max_body: int) -> falcon.App[falcon.Request, falcon.Response]:
    app: falcon.App[falcon.Request, falcon.Response] = falcon.App()
    resource = NoopWebhook(max_body)
    app.add_route(webhook_path, resource)
    app.add_route("/healthz", resource)
    return app


class NoopApplication(BaseApplication):  # type: ignore[misc]
    def __init__(self, options: dict[str, Any], webhook_path: str, max_body: int) -> None:
        self._options = options
        self._webhook_path = webhook_path
        self._max_body = max_body
        super().__init__()

    def load_config(self) -> None:
        for key, value in self._options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        return create_app(self._webhook_path, self._max_body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--bind", required=True)
    parser.add_argument("--workers", type=int)
    args = parser.parse_args()
    config = load_config(Path(args.config))
    options = gunicorn_options(config, args.bind, args.workers)
    server = config.server
    NoopApplication(options, server.webhook_path, server.max_body_bytes).run()


if __name__ == "__main__":
    main()
