"""The outbound policy and download deadline, tried as an attacker's task URL would.

Traffic goes only to 127.0.0.1 servers these tests start: other ranges are reached by names that
an injected resolver maps to them, and a guard fails any test whose code tries to connect to an
address other than 127.0.0.1.
"""

from __future__ import annotations

import ipaddress
import shutil
import socket
import socketserver
import ssl
import threading
import time

import numpy as np
import pytest

from serving.labelstudio.images import ImageError, ImageLoader
from serving.labelstudio.outbound import OutboundPolicy, OutboundRefused, parse_allow
from serving.settings import Settings
from tests.conftest import self_signed_certificate
from tests.http_fixtures import LEGACY_TOKEN, FileServer, png_bytes

IMAGE = (np.arange(24 * 32 * 3) % 251).astype(np.uint8).reshape(24, 32, 3)
REFUSED = "refused by the outbound policy"


@pytest.fixture(autouse=True)
def only_loopback(monkeypatch):
    """Any connect() to an address other than 127.0.0.1 fails the test instead."""
    connect = socket.socket.connect

    def guarded(sock, address):
        assert address[0] == "127.0.0.1", f"tried to connect to {address}"
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


class FakeDNS:
    """A resolver from a table (name -> addresses); records the names asked."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.asked: list[str] = []

    def __call__(self, host: str, port: int) -> list[str]:
        self.asked.append(host)
        if host not in self.table:
            raise socket.gaierror(f"{host}: unknown in the test's table")
        return self.table[host]


def refused(loader: ImageLoader, url: str, message: str = REFUSED) -> ImageError:
    started = time.monotonic()
    with pytest.raises(ImageError, match=message) as error:
        loader.load(url, task_id=1)
    assert 400 <= error.value.status < 500
    assert time.monotonic() - started < 2
    return error.value


def test_loopback_that_is_not_the_ls_host_is_refused(file_server, second_server):
    second_server.files["/a.png"] = png_bytes(IMAGE)
    loader = ImageLoader(file_server.url, LEGACY_TOKEN)
    port = second_server.url.rsplit(":", 1)[1]
    for host in ("127.0.0.1", "localhost", "127.1", "2130706433", "0x7f000001", "[::ffff:7f00:1]"):
        assert refused(loader, f"http://{host}:{port}/a.png").status == 422
    assert second_server.requests == []
    # The LS host itself (on loopback) is allowed, with its credentials.
    file_server.files["/data/upload/1/a.png"] = png_bytes(IMAGE)
    assert loader.load(f"{file_server.url}/data/upload/1/a.png").size == (32, 24)
    assert file_server.requests == [("/data/upload/1/a.png", f"Token {LEGACY_TOKEN}")]


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.1.2.3",
        "::1",
        "10.1.2.3",
        "172.16.5.4",
        "192.168.0.10",
        "fd12:3456::1",
        "169.254.169.254",  # cloud metadata
        "fe80::1",
        "224.0.0.251",
        "ff02::1",
        "0.0.0.0",
        "::",
        "240.0.0.1",
        "100.64.0.1",
        "::ffff:10.0.0.1",
        "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
    ],
)
def test_names_resolving_to_non_public_addresses_are_refused(address):
    dns = FakeDNS({"images.test": [address]})
    loader = ImageLoader(resolver=dns)
    error = refused(loader, "http://images.test/latest/meta-data/x.png")
    assert address not in str(error)  # what a name resolves to is not told to the caller
    assert dns.asked == ["images.test"]
    literal = f"[{address}]" if ":" in address else address
    refused(loader, f"http://{literal}/x.png")
    refused(loader, f"https://{literal}:8443/x.png")


def test_one_non_public_address_among_public_ones_is_refused():
    policy = OutboundPolicy(resolver=FakeDNS({"mixed.test": ["93.184.216.34", "10.0.0.7"]}))
    with pytest.raises(OutboundRefused):
        policy.addresses("mixed.test", 80)
    public = OutboundPolicy(resolver=FakeDNS({"cdn.test": ["93.184.216.34", "2606:2800::1"]}))
    assert public.addresses("cdn.test", 443) == ["93.184.216.34", "2606:2800::1"]


def test_allow_list_opens_named_hosts_and_networks(second_server):
    second_server.files["/a.png"] = png_bytes(IMAGE)
    port = second_server.url.rsplit(":", 1)[1]
    dns = FakeDNS({"minio.test": ["127.0.0.1"], "s3.minio.test": ["127.0.0.1"]})
    url = f"http://minio.test:{port}/a.png"
    for allow in ("", "10.0.0.0/8", "other.test", "*.other.test"):
        refused(ImageLoader(outbound_allow=allow, resolver=dns), url)
    assert second_server.requests == []
    for allow in ("minio.test", "127.0.0.0/8", "10.0.0.0/8, 127.0.0.1", "*.test"):
        dns.asked.clear()
        loader = ImageLoader(outbound_allow=allow, resolver=dns)
        assert loader.load(url).size == (32, 24)
        # Resolved once and connected to that address (the system cannot resolve *.test).
        assert dns.asked == ["minio.test"]
    assert ImageLoader(outbound_allow="*.minio.test", resolver=dns).load(
        f"http://s3.minio.test:{port}/a.png"
    ).size == (32, 24)
    assert len(second_server.requests) == 5


def test_redirects_are_checked_on_every_hop(file_server, second_server):
    second_server.files["/elsewhere.png"] = png_bytes(IMAGE)
    file_server.redirects["/data/upload/1/r.png"] = f"{second_server.url}/elsewhere.png"
    file_server.redirects["/data/upload/1/meta.png"] = "http://metadata.test/computeMetadata/v1/"
    file_server.redirects["/data/upload/1/file.png"] = "file:///etc/passwd"
    file_server.redirects["/data/upload/1/gopher.png"] = f"gopher://127.0.0.1:{6379}/_INFO"
    dns = FakeDNS({"metadata.test": ["169.254.169.254"]})
    loader = ImageLoader(file_server.url, LEGACY_TOKEN, resolver=dns)
    for name in ("r", "meta", "file", "gopher"):
        refused(loader, f"/data/upload/1/{name}.png")
    assert second_server.requests == [] and dns.asked == ["metadata.test"]
    # A public-looking host that redirects back to loopback: refused at the second hop.
    second_server.redirects["/hop.png"] = f"{second_server.url}/elsewhere.png"
    allowed = ImageLoader(outbound_allow="hop.test", resolver=FakeDNS({"hop.test": ["127.0.0.1"]}))
    port = second_server.url.rsplit(":", 1)[1]
    refused(allowed, f"http://hop.test:{port}/hop.png")
    assert second_server.requests == [("/hop.png", None)]


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "FILE:///etc/passwd",
        "gopher://127.0.0.1:6379/_FLUSHALL",
        "ftp://127.0.0.1/a.png",
        "dict://127.0.0.1:11211/stats",
        "jar:http://127.0.0.1/a.jar!/a.png",
    ],
)
@pytest.mark.parametrize("with_ls", [False, True])
def test_other_schemes_are_refused(url, with_ls, file_server):
    loader = ImageLoader(file_server.url, LEGACY_TOKEN) if with_ls else ImageLoader()
    assert refused(loader, url).status == 422
    assert file_server.requests == []


def test_other_hosts_failures_do_not_echo_status_or_body(file_server, second_server):
    second_server.files["/a.png"] = b"secret internal page"
    loader = ImageLoader(file_server.url, LEGACY_TOKEN, outbound_allow="127.0.0.1")
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        closed_port = closed.getsockname()[1]
    messages = set()
    for url in (
        f"{second_server.url}/missing.png",  # 404
        f"{second_server.url}/data/upload/a.png",  # 401 with a JSON body
        f"http://127.0.0.1:{closed_port}/a.png",  # connection refused
    ):
        error = refused(loader, url, "image download failed")
        assert error.status == 422
        messages.add(str(error).split(": ")[0])
        for leak in ("404", "401", "auth", "not found", "refused", "Errno"):
            assert leak not in str(error)
    assert messages == {"image download failed"}
    # The LS host's failures keep their status: the user's own LS.
    with pytest.raises(ImageError, match="HTTP 404") as error:
        loader.load("/data/upload/1/missing.png")
    assert error.value.status == 404


def test_https_connects_to_the_checked_address_and_verifies_the_name(tmp_path, monkeypatch):
    """TLS to a name pinned to its resolved address: SNI and certificate check use the name."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    cert, key = self_signed_certificate(tmp_path, "images.test", "DNS:images.test")
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the only CA the loader trusts
    server = FileServer()
    server.files["/a.png"] = png_bytes(IMAGE)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    names: list[str] = []
    context.sni_callback = lambda connection, name, _: names.append(name)
    server.httpd.socket = context.wrap_socket(server.httpd.socket, server_side=True)
    try:
        port = server.url.rsplit(":", 1)[1]
        dns = FakeDNS({"images.test": ["127.0.0.1"]})
        loader = ImageLoader(outbound_allow="images.test, 127.0.0.1", resolver=dns)
        assert loader.load(f"https://images.test:{port}/a.png").size == (32, 24)
        assert names == ["images.test"] and dns.asked == ["images.test"]
        # The same server by its address: the certificate does not name it.
        refused(loader, f"https://127.0.0.1:{port}/a.png", "image download failed")
        assert server.requests == [("/a.png", None)]
    finally:
        server.close()


class TrickleServer:
    """A 127.0.0.1 HTTP server that answers too slowly: ``mode`` "body" sends the headers then
    one body byte per ``interval`` s, "headers" one header byte per interval, "silent" the
    headers and then nothing. Stops sending when the client goes away or the test ends."""

    def __init__(self, mode: str, interval: float = 0.5) -> None:
        self.stop = threading.Event()
        server = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += self.request.recv(4096)
                head = b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\n"
                try:
                    if mode == "headers":
                        for byte in head:
                            self.request.sendall(bytes([byte]))
                            if server.stop.wait(interval):
                                return
                    self.request.sendall(head)
                    while not server.stop.wait(interval):
                        if mode == "body":
                            self.request.sendall(b"\x89")
                except OSError:  # the client gave up
                    return

        self.tcp = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.tcp.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.tcp.server_address[1]}/a.png"
        threading.Thread(target=self.tcp.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.stop.set()
        self.tcp.shutdown()
        self.tcp.server_close()


@pytest.mark.parametrize("mode", ["body", "headers", "silent"])
@pytest.mark.parametrize("as_ls_host", [False, True])
def test_slow_downloads_end_at_the_deadline(mode, as_ls_host):
    server = TrickleServer(mode)
    try:
        base = server.url.rsplit("/", 1)[0]
        loader = ImageLoader(
            base if as_ls_host else "",
            LEGACY_TOKEN if as_ls_host else "",
            timeout_seconds=20,  # per read: never reached
            download_deadline_seconds=1.0,
            outbound_allow="" if as_ls_host else "127.0.0.1",
        )
        started = time.monotonic()
        with pytest.raises(ImageError, match="deadline") as error:
            loader.load(server.url)
        elapsed = time.monotonic() - started
        assert error.value.status == 422
        assert 0.9 < elapsed < 2.5, elapsed  # measured: 1.002 s in every mode
    finally:
        server.close()


def test_settings():
    settings = Settings.from_env({})
    assert settings.outbound_allow == "" and not settings.label_studio_trust_setup_host
    assert settings.download_deadline_seconds == 60
    settings = Settings.from_env(
        {
            "OUTBOUND_ALLOW": "minio.internal, 10.0.0.0/8,*.corp.example,[fd00::5]",
            "LABEL_STUDIO_TRUST_SETUP_HOST": "true",
            "DOWNLOAD_DEADLINE_SECONDS": "5",
        }
    )
    assert settings.label_studio_trust_setup_host and settings.download_deadline_seconds == 5
    names, networks = parse_allow(settings.outbound_allow)
    assert names == {"minio.internal", "*.corp.example"}
    assert networks == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::5/128"))
    for bad in ("http://minio:9000", "10.0.0.0/33", "a b", "minio:9000"):
        with pytest.raises(ValueError, match="OUTBOUND_ALLOW"):
            Settings.from_env({"OUTBOUND_ALLOW": bad})
    with pytest.raises(ValueError, match="DOWNLOAD_DEADLINE_SECONDS"):
        Settings.from_env({"DOWNLOAD_DEADLINE_SECONDS": "0"})


@pytest.mark.slow
def test_the_running_app_answers_ssrf_tasks_with_4xx_json(file_server, second_server):
    """Clicks on tasks whose image is an SSRF target: a 4xx JSON message each, quickly, and a
    click on the LS host's image is still served afterwards."""
    from starlette.testclient import TestClient

    from backend.app import create_app
    from tests.conftest import TI_CHECKPOINT
    from tests.http_fixtures import keypoint, predict_request, wait_until_ready

    file_server.files["/data/upload/1/a.png"] = png_bytes(np.zeros((480, 640, 3), np.uint8))
    file_server.redirects["/data/upload/1/r.png"] = f"{second_server.url}/a.png"
    second_server.files["/a.png"] = png_bytes(IMAGE)
    settings = Settings.from_env(
        {"LABEL_STUDIO_URL": file_server.url, "LABEL_STUDIO_API_KEY": LEGACY_TOKEN},
        checkpoint=TI_CHECKPOINT,
        device="cpu",
        download_deadline_seconds=1.0,
    )
    trickle = TrickleServer("body")
    targets = [
        f"{second_server.url}/a.png",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::ffff:127.0.0.1]:6379/",
        "http://10.0.0.1/a.png",
        "/data/upload/1/r.png",
        "file:///etc/passwd",
        "gopher://127.0.0.1:6379/_INFO",
        trickle.url,
    ]
    try:
        with TestClient(create_app(settings)) as client:
            assert wait_until_ready(client).status_code == 200
            for target in targets:
                task = {"id": 1, "data": {"image": target}, "project": 1, "annotations": []}
                request = predict_request([task], {"result": [keypoint(50, 50)]})
                started = time.monotonic()
                response = client.post("/predict", json=request)
                assert 400 <= response.status_code < 500, (target, response.text)
                assert time.monotonic() - started < 3
                message = str(response.json())
                assert REFUSED in message or "deadline" in message, (target, message)
            task = {"id": 1, "data": {"image": "/data/upload/1/a.png"}, "project": 1}
            response = client.post(
                "/predict", json=predict_request([task], {"result": [keypoint(50, 50)]})
            )
            assert response.status_code == 200, response.text
        assert second_server.requests == []
    finally:
        trickle.close()


def test_a_batch_request_budget_caps_the_download_deadline(monkeypatch):
    """The embedded backend predicts a batch task inside LS's request: its remaining time budget
    (``caller_deadline``) caps DOWNLOAD_DEADLINE_SECONDS, so a slow LS host cannot carry the
    request past LS's 100 s."""
    from serving.labelstudio.images import caller_deadline

    server = TrickleServer("body")
    try:
        base = server.url.rsplit("/", 1)[0]
        loader = ImageLoader(base, LEGACY_TOKEN, timeout_seconds=20, download_deadline_seconds=60)
        token = caller_deadline.set(time.monotonic() + 0.5)
        started = time.monotonic()
        try:
            with pytest.raises(ImageError, match="time budget"):
                loader.load(server.url)
        finally:
            caller_deadline.reset(token)
        assert time.monotonic() - started < 2.0
    finally:
        server.close()
