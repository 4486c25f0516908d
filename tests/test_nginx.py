"""The shipped nginx configuration, run by Debian's real nginx in front of a real exporter.

The test renders deploy/nginx/mcn-exporter.conf as shipped, changing only what is site-specific
(listen port, certificate, upstream port, log path), each by an exact substitution that must
match once. Other loopback addresses than 127.0.0.1 stand for clients on the internet: the
shipped config allows /metrics from 127.0.0.1 only.
"""

from __future__ import annotations

import http.client
import http.server
import json
import os
import re
import resource
import selectors
import shutil
import socket
import ssl
import subprocess
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from exporter.app import OK_BODY
from tests.conftest import ACCOUNT, SECRET, Samples, ServerProcess, free_port, parse_samples

pytestmark = pytest.mark.server

NGINX = Path("/usr/sbin/nginx")
SHIPPED = Path(__file__).parent.parent / "deploy" / "nginx" / "mcn-exporter.conf"
PROMETHEUS = "127.0.0.1"  # the address the shipped config allows on /metrics
OUTSIDER = "127.0.0.2"  # any other address: a client on the internet
MAX_BODY = 64 * 1024  # the exporter's default server.max_body_bytes
# Generous: what is bounded here is "answered at all while under load"; starved requests to a
# bare exporter waited a minute and more.
ANSWER_BOUND = 5.0
# How late after nginx's configured timeout a slow connection may still be seen open: nginx's
# timers, the client's polling and a loaded machine.
CLOSE_MARGIN = 5.0


def shipped_seconds(directive: str) -> float:
    """A timeout as the shipped config sets it, so the test follows the file."""
    found = re.search(rf"^\s*{directive} (\d+)s;", SHIPPED.read_text(), re.MULTILINE)
    assert found, f"{SHIPPED} sets no {directive} in seconds"
    return float(found.group(1))


# -- nginx, started by the test ---------------------------------------------------------------


@dataclass
class Tls:
    certificate: Path
    key: Path

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.certificate))


def make_certificate(directory: Path) -> Tls:
    """A self-signed certificate for 127.0.0.1, so clients verify it as they would a real one."""
    if not shutil.which("openssl"):
        pytest.fail("openssl is missing: run scripts/install-system-deps")
    tls = Tls(directory / "cert.pem", directory / "key.pem")
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout",
            str(tls.key),
            "-out",
            str(tls.certificate),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return tls


def render_site(port: int, exporter_port: int, tls: Tls, directory: Path) -> str:
    """The shipped server block with this test's port, certificate, upstream and log."""
    text = SHIPPED.read_text()
    substitutions = {
        "listen 443 ssl;": f"listen 127.0.0.1:{port} ssl;",
        "listen [::]:443 ssl;": "",  # the test listens on the IPv4 loopback only
        "/etc/letsencrypt/live/mcn-exporter.example.com/fullchain.pem": str(tls.certificate),
        "/etc/letsencrypt/live/mcn-exporter.example.com/privkey.pem": str(tls.key),
        "server 127.0.0.1:9880;": f"server 127.0.0.1:{exporter_port};",
        "/var/log/nginx/mcn-exporter.access.log": str(directory / "access.log"),
    }
    for shipped, rendered in substitutions.items():
        assert text.count(shipped) == 1, f"{SHIPPED} no longer has exactly one {shipped!r}"
        text = text.replace(shipped, rendered)
    return text


def render_main(site: Path, directory: Path) -> str:
    """The nginx.conf around it, as Debian's includes conf.d/ inside http, temp files in tmp."""
    # As root, nginx's workers would switch to `nobody`, who cannot enter pytest's directories.
    user = "user root;\n" if os.geteuid() == 0 else ""
    temp_paths = "".join(
        f"    {kind}_temp_path {directory / kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return (
        f"{user}worker_processes 1;\n"
        "events { worker_connections 1024; }\n"
        "http {\n"
        f"{temp_paths}"
        f"    include {site};\n"
        "}\n"
    )


@dataclass
class Nginx:
    directory: Path
    upstream_port: int
    tls: Tls
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        if not NGINX.exists():
            pytest.fail(f"{NGINX} is missing: run scripts/install-system-deps (Debian's nginx)")
        site = self.directory / "mcn-exporter.conf"
        site.write_text(render_site(self.port, self.upstream_port, self.tls, self.directory))
        main = self.directory / "nginx.conf"
        main.write_text(render_main(site, self.directory))
        directives = f"daemon off; pid {self.directory / 'nginx.pid'}; error_log {self.error_log};"
        self.process = subprocess.Popen(
            [str(NGINX), "-p", str(self.directory), "-c", str(main), "-g", directives],
            stdout=subprocess.DEVNULL,
            stderr=(self.directory / "nginx.stderr").open("wb"),
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nginx exited at start:\n{self.log()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"nginx did not come up:\n{self.log()}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    @property
    def error_log(self) -> Path:
        return self.directory / "error.log"

    def log(self) -> str:
        stderr = self.directory / "nginx.stderr"
        return "".join(
            p.read_text(errors="replace") for p in (stderr, self.error_log) if p.exists()
        )

    def connect(self, source: str = PROMETHEUS) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection(
            "127.0.0.1",
            self.port,
            timeout=30,
            context=self.tls.client_context(),
            source_address=(source, 0),
        )

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        source: str = PROMETHEUS,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, http.client.HTTPMessage, bytes]:
        """One request on a new connection, as the provider and Prometheus make them."""
        connection = self.connect(source)
        try:
            headers = headers or {}
            chunked = headers.get("Transfer-Encoding") == "chunked"
            connection.request(method, path, body=body, headers=headers, encode_chunked=chunked)
            response = connection.getresponse()
            return response.status, response.headers, response.read()
        finally:
            connection.close()

    def samples(self) -> Samples:
        status, _, body = self.request("GET", "/metrics")
        assert status == 200, body
        return parse_samples(body.decode())


@pytest.fixture
def start_nginx(tmp_path: Path) -> Iterator[Callable[[int], Nginx]]:
    """nginx on a free port with the shipped config, in front of the given upstream port."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4096 if hard == resource.RLIM_INFINITY else min(4096, hard)
    if soft < wanted:  # 200 slow clients, and nginx (which inherits it) holds two sockets each
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    started: list[Nginx] = []

    def start(upstream_port: int) -> Nginx:
        directory = tmp_path / "nginx"
        directory.mkdir()
        proxy = Nginx(directory, upstream_port, make_certificate(directory))
        started.append(proxy)
        proxy.start()
        return proxy

    yield start
    for proxy in started:
        proxy.stop()
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture
def nginx(
    start_nginx: Callable[[int], Nginx], start_server: Callable[..., ServerProcess]
) -> Iterator[Nginx]:
    """The shipped config in front of a real exporter with its default two workers."""
    exporter = start_server(workers=2)
    yield start_nginx(exporter.port)
    exporter.stop()  # drained, workers and all, rather than killed at teardown


_call_numbers = iter(range(1_000_000))


def start_event() -> bytes:
    number = next(_call_numbers)
    return json.dumps(
        {
            "event_type": "onInCallingStart",
            "abon": "108",
            "did": "0222202999",
            "call_id": f"nginx-{number}",
            "secret": SECRET,
            "account_id": ACCOUNT,
        }
    ).encode()


def rejected(samples: Samples) -> dict[str, float]:
    series = samples.get("mcn_webhook_rejected_total", {})
    assert series, "mcn_webhook_rejected_total is missing from /metrics"
    return {dict(labels)["reason"]: value for labels, value in series.items()}


def deliveries(samples: Samples) -> float:
    return sum(samples.get("mcn_webhook_events_total", {}).values())


# -- what is public and what is not -----------------------------------------------------------


def test_the_shipped_file_loads_into_debians_own_nginx_conf(tmp_path: Path) -> None:
    """Installed as the header says, in conf.d/ next to Debian's default site, it passes -t."""
    debian = Path("/etc/nginx")
    if not (debian / "nginx.conf").exists():
        pytest.fail(f"{debian}/nginx.conf is missing: run scripts/install-system-deps")
    etc = tmp_path / "etc-nginx"
    shutil.copytree(debian, etc, symlinks=False)
    tls = make_certificate(tmp_path)
    (etc / "conf.d" / "mcn-exporter.conf").write_text(
        render_site(443, 9880, tls, tmp_path)  # port 443 as shipped: -t binds nothing
    )
    main = etc / "nginx.conf"
    main.write_text(
        main.read_text()
        .replace("/etc/nginx/", f"{etc}/")
        .replace("/var/log/nginx/", f"{tmp_path}/")
        .replace("/run/nginx.pid", f"{tmp_path}/nginx.pid")
    )

    checked = subprocess.run(
        [str(NGINX), "-t", "-p", str(tmp_path), "-c", str(main)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert checked.returncode == 0, checked.stderr
    assert "test is successful" in checked.stderr


def test_a_webhook_over_tls_reaches_the_exporter_and_counts(nginx: Nginx) -> None:
    status, headers, body = nginx.request("POST", "/webhook", start_event(), source=OUTSIDER)

    assert (status, body) == (200, OK_BODY)
    assert headers["Strict-Transport-Security"]
    samples = nginx.samples()
    assert deliveries(samples) == 1
    assert (
        samples["mcn_calls_started_total"][
            (
                ("account", str(ACCOUNT)),
                ("direction", "inbound"),
                ("extension", "108"),
                ("service", "vpbx"),
            )
        ]
        == 1
    )
    assert set(rejected(samples).values()) == {0}


def tls_handshake(nginx: Nginx, version: ssl.TLSVersion, ciphers: str) -> str:
    """Our client offers only this version and ciphers (old ones allowed); nginx chooses."""
    context = nginx.tls.client_context()
    context.set_ciphers(f"{ciphers}:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.0 and 1.1, on purpose
        context.minimum_version = context.maximum_version = version
    try:
        with context.wrap_socket(
            socket.create_connection(("127.0.0.1", nginx.port), 30),
            server_hostname="127.0.0.1",
        ) as sock:
            return f"{sock.version()} {sock.cipher()[0]}"  # type: ignore[index]
    except ssl.SSLError as error:
        return f"refused: {error.reason}"


def test_tls_offers_modern_protocols_and_ciphers_only(nginx: Nginx) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old = (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1)
    for version in old:
        assert tls_handshake(nginx, version, "ALL") == "refused: TLSV1_ALERT_PROTOCOL_VERSION"
    # CBC without AEAD, and no forward secrecy: refused even on TLS 1.2
    for cipher in ("ECDHE-ECDSA-AES128-SHA", "AES128-GCM-SHA256"):
        assert tls_handshake(nginx, ssl.TLSVersion.TLSv1_2, cipher).startswith("refused")
    assert tls_handshake(nginx, ssl.TLSVersion.TLSv1_2, "ALL").startswith("TLSv1.2 ECDHE-")
    assert tls_handshake(nginx, ssl.TLSVersion.TLSv1_3, "ALL").startswith("TLSv1.3 ")


def test_only_post_webhook_is_public(nginx: Nginx) -> None:
    for method in ("GET", "PUT", "DELETE"):
        status, headers, body = nginx.request(method, "/webhook", source=OUTSIDER)
        assert (status, headers["Allow"]) == (405, "POST"), method
        assert json.loads(body)["reason"] == "method_not_allowed"
    status, headers, _ = nginx.request("HEAD", "/webhook", source=OUTSIDER)
    assert (status, headers["Allow"]) == (405, "POST")
    for path in ("/metrics", "/healthz", "/readyz"):
        status, _, body = nginx.request("GET", path, source=OUTSIDER)
        assert (status, json.loads(body)["reason"]) == (403, "forbidden"), path
        assert nginx.request("GET", path, source=PROMETHEUS)[0] == 200, path
    for path in ("/", "/webhook/", "/admin", "/metrics.php", "/.env"):
        status, _, body = nginx.request("GET", path, source=PROMETHEUS)
        assert (status, json.loads(body)["reason"]) == (404, "not_found"), path

    samples = nginx.samples()
    assert deliveries(samples) == 0
    # nginx answered all of these: the exporter counted no refused webhook
    assert set(rejected(samples).values()) == {0}


def test_the_exporter_sees_whole_requests_and_its_own_refusals_pass_through(nginx: Nginx) -> None:
    wrong_secret = json.loads(start_event())
    wrong_secret["secret"] = "guess"
    status, _, body = nginx.request("POST", "/webhook", json.dumps(wrong_secret).encode())
    assert (status, json.loads(body)["reason"]) == (401, "unauthorized")
    # a chunked body is read whole by nginx and passed on with its length
    status, _, body = nginx.request(
        "POST", "/webhook", start_event(), headers={"Transfer-Encoding": "chunked"}
    )
    assert status == 200, body

    samples = nginx.samples()
    assert deliveries(samples) == 1
    assert rejected(samples)["unauthorized"] == 1


def test_an_oversized_body_is_refused_by_nginx_before_the_exporter(nginx: Nginx) -> None:
    just_fits = b" " * (MAX_BODY - 2) + b"{}"
    status, _, body = nginx.request("POST", "/webhook", just_fits)
    assert (status, json.loads(body)["reason"]) == (422, "invalid")  # the exporter's answer

    for headers in ({}, {"Transfer-Encoding": "chunked"}):
        status, _, body = nginx.request("POST", "/webhook", b"x" * (MAX_BODY + 1), headers=headers)
        assert (status, json.loads(body)["reason"]) == (413, "too_large"), headers

    # the exporter saw the body that fits, not the others
    counts = rejected(nginx.samples())
    assert counts.pop("invalid") == 1
    assert set(counts.values()) == {0}


def test_an_exporter_down_is_a_503_to_retry(start_nginx: Callable[[int], Nginx]) -> None:
    nginx = start_nginx(free_port())  # nothing listens there

    status, headers, body = nginx.request("POST", "/webhook", start_event())

    assert (status, headers["Retry-After"]) == (503, "5")
    assert json.loads(body)["reason"] == "exporter_unavailable"


def raw_exchange(nginx: Nginx, request: bytes, source: str = OUTSIDER) -> bytes:
    """Bytes over TLS as they are, and all nginx answers until it closes."""
    with nginx.tls.client_context().wrap_socket(
        socket.create_connection(("127.0.0.1", nginx.port), 30, (source, 0)),
        server_hostname="127.0.0.1",
    ) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer


def test_a_body_announced_too_large_is_refused_before_it_is_sent(nginx: Nginx) -> None:
    answer = raw_exchange(
        nginx,
        b"POST /webhook HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 10000000\r\n"
        b"Expect: 100-continue\r\n\r\n",
    )
    # no "100 Continue" first, and the connection closed with the refusal
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert b"Connection: close" in answer
    assert answer.endswith(b'"too_large","error":"body is over 65536 bytes"}\n')


def test_requests_too_broken_for_http_are_refused_by_nginx(nginx: Nginx) -> None:
    long_path = b"/webhook?" + b"x" * 9000
    huge_header = b"X-Padding: " + b"x" * 9000 + b"\r\n"
    for request, status in (
        (b"POST " + long_path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", b"414"),
        (b"POST /webhook HTTP/1.1\r\nHost: 127.0.0.1\r\n" + huge_header + b"\r\n", b"400"),
        (b"POST /webhook HTTP/1.1\r\n\r\n", b"400"),  # no Host
        (b"BREW /webhook HTCPCP/1.0\r\n\r\n", b"400"),
    ):
        answer = raw_exchange(nginx, request)
        assert answer.startswith(b"HTTP/1.1 " + status + b" "), answer[:200]

    assert set(rejected(nginx.samples()).values()) == {0}


def test_plain_http_to_the_tls_port_is_refused(nginx: Nginx) -> None:
    body = start_event()
    with socket.create_connection(("127.0.0.1", nginx.port), timeout=30) as sock:
        sock.sendall(
            b"POST /webhook HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk

    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b"plain HTTP request was sent to HTTPS port" in answer
    assert deliveries(nginx.samples()) == 0


def test_a_client_holding_many_requests_open_is_limited(nginx: Nginx) -> None:
    """limit_conn: a 21st request in progress from one address gets 429 at once."""
    held = [SlowClient.open("slow body", nginx, OUTSIDER) for _ in range(20)]
    try:
        status, _, body = nginx.request("POST", "/webhook", start_event(), source=OUTSIDER)
        assert (status, json.loads(body)["reason"]) == (429, "too_many_requests")
        # another address is not affected
        assert nginx.request("POST", "/webhook", start_event(), source="127.0.0.3")[0] == 200
    finally:
        for client in held:
            client.sock.close()
    assert deliveries(nginx.samples()) == 1


def test_a_flood_from_one_address_is_limited(nginx: Nginx) -> None:
    """limit_req: past its burst, requests from one address get 429 (nginx stops counting)."""
    # pipelined on one connection: nginx meets them all within a fraction of a second
    answers = raw_exchange(
        nginx,
        b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" * 300
        + b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    )

    statuses = re.findall(rb"^HTTP/1\.1 (\d{3}) ", answers, re.MULTILINE)
    assert statuses[0] == b"403"
    assert b"429" in statuses
    assert set(statuses) == {b"403", b"429"}
    assert b"Retry-After: 1\r\n" in answers


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes


class RecordingUpstream(http.server.ThreadingHTTPServer):
    """Stands where the exporter would, to show what nginx passes on and when."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        super().__init__(("127.0.0.1", 0), RecordingHandler)


class RecordingHandler(http.server.BaseHTTPRequestHandler):
    server: RecordingUpstream

    def do_POST(self) -> None:
        # noted on the headers' arrival, before the body is read
        received = Received(dict(self.headers.items()), b"")
        self.server.received.append(received)
        received.body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.send_response(200)
        self.send_header("Content-Length", "15")
        self.end_headers()
        self.wfile.write(b'{"status":"ok"}')

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet test output


@pytest.fixture
def recording_upstream() -> Iterator[RecordingUpstream]:
    upstream = RecordingUpstream()
    thread = threading.Thread(target=upstream.serve_forever, daemon=True)
    thread.start()
    yield upstream
    upstream.shutdown()
    upstream.server_close()


def test_nginx_passes_on_whole_requests_with_the_real_client_address(
    start_nginx: Callable[[int], Nginx], recording_upstream: RecordingUpstream
) -> None:
    nginx = start_nginx(recording_upstream.server_address[1])
    body = start_event()
    head = (
        b"POST /webhook HTTP/1.1\r\nHost: mcn.example\r\nContent-Length: %d\r\n"
        b"X-Forwarded-For: 203.0.113.9\r\nX-Real-IP: 203.0.113.9\r\n\r\n" % len(body)
    )
    with nginx.tls.client_context().wrap_socket(
        socket.create_connection(("127.0.0.1", nginx.port), 30, (OUTSIDER, 0)),
        server_hostname="127.0.0.1",
    ) as sock:
        sock.sendall(head + body[:10])
        time.sleep(1.0)
        # request buffering: nothing reaches the upstream while the body is incomplete
        assert recording_upstream.received == []
        sock.sendall(body[10:])
        answer = sock.recv(65536)

    assert answer.startswith(b"HTTP/1.1 200 ")
    [request] = recording_upstream.received
    assert request.body == body
    # what a client claims is replaced by the address nginx saw
    assert request.headers["X-Forwarded-For"] == OUTSIDER
    assert request.headers["X-Real-IP"] == OUTSIDER
    assert request.headers["X-Forwarded-Proto"] == "https"
    assert request.headers["Host"] == "mcn.example"


# -- slow clients -----------------------------------------------------------------------------

HEADERS_TIMEOUT = shipped_seconds("client_header_timeout")
BODY_TIMEOUT = shipped_seconds("client_body_timeout")
TRICKLE_INTERVAL = 2.0  # a byte every few seconds: well inside nginx's timeouts between reads
SLOW_BODY_BYTES = 4  # sent one by one, then the client stalls with the rest of its body unsent
SLOW_BODY_HEAD = b"POST /webhook HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 300\r\n\r\n"
TRICKLED = b"POST /webhook HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: " + b"s" * 1000
KINDS = ("idle", "one byte", "trickled headers", "slow body")


@dataclass
class SlowClient:
    """One slow connection to nginx and what it still sends, a byte at a time."""

    kind: str
    sock: socket.socket
    opened: float
    pending: bytes = b""
    last_sent: float = 0.0
    closed: float | None = None

    @classmethod
    def open(cls, kind: str, nginx: Nginx, source: str) -> SlowClient:
        opened = time.monotonic()
        sock = socket.create_connection(("127.0.0.1", nginx.port), 30, (source, 0))
        if kind == "idle":  # not even a TLS hello
            return cls(kind, sock, opened, last_sent=opened)
        sock = nginx.tls.client_context().wrap_socket(sock, server_hostname="127.0.0.1")
        first, pending = {
            "one byte": (b"P", b""),
            "trickled headers": (TRICKLED[:1], TRICKLED[1:]),
            "slow body": (SLOW_BODY_HEAD, b"{" * SLOW_BODY_BYTES),
        }[kind]
        sock.sendall(first)
        sock.setblocking(False)
        return cls(kind, sock, opened, pending, last_sent=time.monotonic())

    def deadline(self) -> float:
        """When nginx must have closed it: its timeout, from the connection or the last byte."""
        if self.kind == "slow body":
            return self.last_sent + BODY_TIMEOUT
        return self.opened + HEADERS_TIMEOUT

    def trickle(self, now: float) -> None:
        if self.pending and now >= self.last_sent + TRICKLE_INTERVAL:
            try:
                self.sock.send(self.pending[:1])
            except (ssl.SSLWantWriteError, BlockingIOError):
                return
            except OSError:
                self.closed = now
                return
            self.pending = self.pending[1:]
            self.last_sent = time.monotonic()

    def read(self, now: float) -> None:
        """Drain what nginx sent; note when it closed the connection."""
        try:
            while self.sock.recv(4096):
                pass
        except (ssl.SSLWantReadError, BlockingIOError):
            return
        except OSError:
            pass  # a reset (reset_timedout_connection) or a TLS connection cut short
        self.closed = now


@dataclass
class SlowLoad:
    """200 slow connections from other addresses than the legitimate clients'."""

    clients: list[SlowClient] = field(default_factory=list)
    all_open: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None

    def run(self, nginx: Nginx, per_kind: int, give_up: float) -> None:
        try:
            for n in range(per_kind):
                for kind in KINDS:
                    # ten attacking addresses: each stays under the per-address limits
                    source = f"127.0.0.{10 + n % 10}"
                    self.clients.append(SlowClient.open(kind, nginx, source))
            self.all_open.set()
            self.watch(give_up)
        except BaseException as error:
            self.error = error
            self.all_open.set()

    def watch(self, give_up: float) -> None:
        with selectors.DefaultSelector() as selector:
            for client in self.clients:
                selector.register(client.sock, selectors.EVENT_READ, client)
            while self.open() and time.monotonic() < give_up:
                for key, _ in selector.select(timeout=0.1):
                    key.data.read(time.monotonic())
                now = time.monotonic()
                for client in self.open():
                    client.trickle(now)
                for client in self.clients:
                    if client.closed is not None and client.sock.fileno() >= 0:
                        selector.unregister(client.sock)
                        client.sock.close()
        for client in self.clients:
            client.sock.close()

    def open(self) -> list[SlowClient]:
        return [client for client in self.clients if client.closed is None]


def test_slow_clients_neither_starve_the_exporter_nor_stay_connected(nginx: Nginx) -> None:
    load = SlowLoad()
    give_up = time.monotonic() + max(HEADERS_TIMEOUT, BODY_TIMEOUT) * 3 + 30
    slow = threading.Thread(target=load.run, args=(nginx, 50, give_up), daemon=True)
    slow.start()
    assert load.all_open.wait(timeout=120), load.error

    answer_times: list[float] = []
    posted = 0
    while slow.is_alive():  # the provider and Prometheus, from their own addresses
        started = time.monotonic()
        status, _, body = nginx.request("POST", "/webhook", start_event(), source="127.0.0.3")
        answer_times.append(time.monotonic() - started)
        assert (status, body) == (200, OK_BODY)
        posted += 1
        if posted % 4 == 0:
            started = time.monotonic()
            samples = nginx.samples()
            answer_times.append(time.monotonic() - started)
            assert deliveries(samples) == posted
        time.sleep(0.2)
    slow.join()

    assert load.error is None, repr(load.error)
    assert len(load.clients) == 200
    assert not load.open(), f"{len(load.open())} slow connections still open"
    late = {
        (client.kind, round(client.closed - client.deadline(), 1))
        for client in load.clients
        if client.closed is not None and client.closed > client.deadline() + CLOSE_MARGIN
    }
    assert not late, f"closed later than nginx's timeout plus {CLOSE_MARGIN} s: {late}"
    # nginx held each one until its timeout: the load was real, not refused at once
    early = {
        client.kind
        for client in load.clients
        if client.closed is not None and client.closed < client.deadline() - 0.5
    }
    assert not early, f"closed before nginx's timeout: {early}"
    assert max(answer_times) < ANSWER_BOUND, answer_times
    assert posted >= 20  # the legitimate traffic ran throughout the load
    samples = nginx.samples()
    assert deliveries(samples) == posted
    # no slow request ever reached the exporter, not even as a refusal
    assert set(rejected(samples).values()) == {0}
