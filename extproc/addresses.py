"""HOST:PORT addresses and URLs as the settings and logs see them.

Kept on the ground floor so that every layer -- settings, the fleet's logs,
the read APIs' token rule -- uses one parser and one redaction.
"""

from __future__ import annotations

import ipaddress


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"expected HOST:PORT, got {address!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host or "[" in host or "]" in host:
        # "::1:80" could be ::1 port 80 or the address ::1:80 with no port at all, and
        # Envoy cannot route to it as written.
        raise ValueError(f"expected IPv6 in brackets, as [::1]:8000, got {address!r}")
    if not host:
        raise ValueError(f"expected HOST:PORT, got {address!r}")
    return host, int(port)


def format_address(host: str, port: int) -> str:
    """HOST:PORT as `parse_address` reads it back: an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def redact_url(url: str) -> str:
    """The URL without its password, for logs and `config show`."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.split("@", 1)[1]
    return scheme + sep + rest


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a hostname could resolve anywhere
