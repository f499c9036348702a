"""The network rule every server streamsink starts follows: loopback unless told otherwise, and
beyond loopback only with an API key."""
from __future__ import annotations

import ipaddress
import os
import socket

from streamsink.errors import UsageError

LOOPBACK = "127.0.0.1"
API_KEY_ENV = "STREAMSINK_API_KEY"


class ExposureError(UsageError):
    """A bind beyond loopback without an API key (one line, for the user)."""


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def api_key(given: str | None) -> str | None:
    """--api-key, else $STREAMSINK_API_KEY, else None."""
    return given or os.environ.get(API_KEY_ENV) or None


def check_exposure(host: str, key: str | None) -> None:
    """Refuse to serve beyond loopback without a key."""
    if not is_loopback(host) and not key:
        raise ExposureError(
            f"--host {host} opens the API beyond this machine; give --api-key KEY (or "
            f"${API_KEY_ENV}) so clients must authenticate")


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port free on host now (for servers and Prometheus started here)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
