"""Where a webhook may be sent: http(s) URLs whose host resolves only to public addresses (unless the operator
allows private ones). Checked when an endpoint is registered and again at each delivery, which then connects to
the very address it checked (a name that resolves elsewhere by then cannot send it inside the network)."""

from __future__ import annotations

import ipaddress
import socket
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import httpx

MAX_URL_CHARS = 2048
# Name resolution has no timeout of its own: it runs in these threads, and a caller waits at most its timeout.
_resolvers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="webhook-resolver")


class AddressRefused(Exception):
    """The URL cannot be used: the message says why, for the user (no internals)."""

    def __init__(self, message: str, *, private: bool = False) -> None:
        super().__init__(message)
        self.private = private


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def is_public(address: IPAddress) -> bool:
    """Reachable on the public internet: not private, loopback, link-local, shared, reserved or multicast (an
    IPv4 address mapped into IPv6 is judged as itself)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


def parse_url(url: str) -> httpx.URL:
    """The URL, if it is an absolute http(s) URL with a host; else AddressRefused."""
    if len(url) > MAX_URL_CHARS:
        raise AddressRefused(f"the URL is longer than {MAX_URL_CHARS} characters")
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError):
        raise AddressRefused("not a valid URL") from None
    if parsed.scheme not in ("http", "https"):
        raise AddressRefused("only http:// and https:// URLs can receive webhooks")
    if not parsed.raw_host:
        raise AddressRefused("the URL has no host")
    return parsed


def _port(url: httpx.URL) -> int:
    return url.port or (443 if url.scheme == "https" else 80)


def _resolve(host: str, port: int) -> list[IPAddress]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    # The scope of a link-local IPv6 address (`fe80::1%eth0`) is dropped: such an address is refused anyway.
    return list(dict.fromkeys(ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos))


def resolve(url: httpx.URL, *, allow_private: bool, timeout: float) -> list[IPAddress]:
    """The addresses the URL's host stands for, every one public unless `allow_private`; else AddressRefused."""
    host = url.raw_host.decode("ascii")
    try:
        addresses = [ipaddress.ip_address(host)]
    except ValueError:
        try:
            addresses = _resolvers.submit(_resolve, host, _port(url)).result(timeout=timeout)
        except FutureTimeout:
            raise AddressRefused("the URL's host name could not be resolved in time") from None
        except (OSError, UnicodeError, ValueError):
            raise AddressRefused("the URL's host name does not resolve") from None
    if not addresses:
        raise AddressRefused("the URL's host name does not resolve")
    if not allow_private and not all(is_public(address) for address in addresses):
        raise AddressRefused(
            "the URL's host is (or resolves to) a private, loopback or link-local address; the operator allows "
            "those with TUNEFORGE_WEBHOOK_ALLOW_PRIVATE_URLS=true",
            private=True,
        )
    return addresses
