"""The outbound policy for image downloads: which addresses the backend may connect to
(:class:`OutboundPolicy`), enforced where connections are made (:class:`GuardedTransport`),
which also bounds every socket operation by the current download's total deadline.
"""

from __future__ import annotations

import contextvars
import ipaddress
import logging
import re
import socket
import ssl
import time
import typing
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import httpcore
import httpx

logger = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], list[str]]  # (host name, port) -> IP address strings

_HOST_NAME = re.compile(
    r"^(\*\.)?[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*$"
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class OutboundRefused(Exception):
    """A connection the outbound policy does not allow (the message names host and reason)."""


class DeadlineExceeded(Exception):
    """The current download ran past its total deadline."""


def system_resolver(host: str, port: int) -> list[str]:
    """The addresses ``host`` resolves to, in the order the system prefers them."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def parse_allow(text: str) -> tuple[frozenset[str], tuple[IPNetwork, ...]]:
    """``OUTBOUND_ALLOW`` (comma-separated host names, ``*.suffix`` and IPs/CIDRs) ->
    (host names, networks); ValueError names a bad entry."""
    names: set[str] = set()
    networks: list[IPNetwork] = []
    for entry in (e.strip().lower().rstrip(".") for e in text.split(",")):
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            continue
        except ValueError:
            pass
        if not _HOST_NAME.match(entry):
            raise ValueError(f"OUTBOUND_ALLOW: {entry!r} is neither a host name nor an IP/CIDR")
        names.add(entry)
    return frozenset(names), tuple(networks)


def _unwrap(address: IPAddress) -> IPAddress:
    """The IPv4 address behind an IPv4-mapped or NAT64 IPv6 address, else ``address``."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address in _NAT64:
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address


def address_kind(address: IPAddress) -> str | None:
    """Why ``address`` is not a public unicast address ("loopback", "private", ...), or None."""
    address = _unwrap(address)
    for kind in ("loopback", "link_local", "multicast", "unspecified", "reserved", "private"):
        if getattr(address, f"is_{kind}"):
            return kind.replace("_", "-")
    return None if address.is_global else "non-public"


class OutboundPolicy:
    """Decides which addresses a download may connect to.

    * The Label Studio host (host and port of ``LABEL_STUDIO_URL``, or of ``/setup``'s hostname
      when ``LABEL_STUDIO_TRUST_SETUP_HOST`` is on) is allowed wherever it lives, loopback too.
    * Any other host is refused when an address it resolves to is not a public unicast address:
      loopback, private (RFC 1918, ULA fc00::/7, CGNAT 100.64/10), link-local (169.254/16 with
      the cloud metadata address, fe80::/10), multicast, unspecified, reserved or documentation.
    * ``OUTBOUND_ALLOW`` opens named hosts (``minio.internal``, ``*.corp.example``) and networks
      (``10.0.0.0/8``, ``192.168.1.20``), for on-prem storage.

    ``allow``: OUTBOUND_ALLOW's text; ``trusted(host, port)``: whether that is the Label Studio
    host (allowed anywhere); ``resolver``: host name -> addresses (tests inject one that never
    touches DNS)."""

    def __init__(
        self,
        allow: str = "",
        trusted: Callable[[str, int], bool] = lambda host, port: False,
        resolver: Resolver = system_resolver,
    ) -> None:
        self.names, self.networks = parse_allow(allow)
        self.trusted = trusted
        self.resolver = resolver

    def _name_allowed(self, host: str) -> bool:
        return host in self.names or any(
            name.startswith("*.") and host.endswith(name[1:]) for name in self.names
        )

    def addresses(self, host: str, port: int) -> list[str]:
        """The addresses to connect to for ``host:port``, resolved once; OutboundRefused when
        any of them is not allowed, OSError when the name does not resolve."""
        host = host.lower().rstrip(".").strip("[]")
        try:
            literal: IPAddress | None = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        addresses = [host] if literal is not None else self.resolver(host, port)
        if not addresses:
            raise OSError(f"{host} has no address")
        if self.trusted(host, port) or (literal is None and self._name_allowed(host)):
            return addresses
        for text in addresses:
            address = ipaddress.ip_address(text.split("%")[0])
            kind = address_kind(address)
            if kind is None or any(
                _unwrap(address) in network or address in network for network in self.networks
            ):
                continue
            logger.warning(
                "outbound policy: refused %s:%d (resolves to %s, %s); OUTBOUND_ALLOW opens it",
                host,
                port,
                address,
                kind,
            )
            what = "is not" if literal is not None else "resolves to something other than"
            raise OutboundRefused(f"{host} {what} a public address; OUTBOUND_ALLOW can allow it")
        return addresses


# -- the network backend: policy at connect time, the deadline on every socket operation -----
_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "download_deadline", default=None
)


@contextmanager
def deadline(seconds: float) -> Iterator[float]:
    """Within this block, every socket operation of a GuardedTransport ends by ``seconds``
    from now (monotonic clock); yields the deadline."""
    at = time.monotonic() + seconds
    token = _DEADLINE.set(at)
    try:
        yield at
    finally:
        _DEADLINE.reset(token)


def _bounded(timeout: float | None) -> float | None:
    """``timeout`` (s) shortened to what is left of the current deadline."""
    at = _DEADLINE.get()
    if at is None:
        return timeout
    left = at - time.monotonic()
    if left <= 0:
        raise DeadlineExceeded("the download deadline passed")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    def __init__(self, stream: httpcore.NetworkStream) -> None:
        self._stream = stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, _bounded(timeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, _bounded(timeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        return _DeadlineStream(
            self._stream.start_tls(ssl_context, server_hostname, _bounded(timeout))
        )

    def get_extra_info(self, info: str) -> typing.Any:
        return self._stream.get_extra_info(info)


class _PolicyBackend(httpcore.NetworkBackend):
    def __init__(self, policy: OutboundPolicy) -> None:
        self.policy = policy
        self._inner = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[typing.Any] | None = None,
    ) -> httpcore.NetworkStream:
        try:
            addresses = self.policy.addresses(host, port)
        except OSError as error:  # the name does not resolve
            raise httpcore.ConnectError(str(error)) from error
        last: Exception | None = None
        for address in addresses:  # like socket.create_connection, but on checked addresses
            try:
                stream = self._inner.connect_tcp(
                    address, port, _bounded(timeout), local_address, socket_options
                )
                return _DeadlineStream(stream)
            except httpcore.ConnectError as failed:
                last = failed
        raise last or httpcore.ConnectError(f"cannot connect to {host}")

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


class GuardedTransport(httpx.HTTPTransport):
    """httpx's HTTP transport whose connections go through the outbound policy and the
    current download deadline (environment proxies are not used: the policy must see the
    address that is connected to). The host name is resolved once, every address checked, and
    the socket connects to those very addresses (no DNS rebinding between check and connect),
    on every request, so on every redirect hop too."""

    def __init__(self, policy: OutboundPolicy) -> None:
        super().__init__()
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(),
            network_backend=_PolicyBackend(policy),
        )
