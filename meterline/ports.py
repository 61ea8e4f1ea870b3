"""Every port `meterline up` will listen on, checked before anything starts.

Light on purpose (no pydantic at import): `python -m meterline up` runs ``check_ports_from_env`` before it imports
the CLI, so a busy port is named within a fraction of a second even on a loaded machine (importing the CLI and
its settings takes seconds there). The defaults live here and ``meterline.settings`` uses them: one source."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from meterline.settings import StackSettings

DEFAULT_API_HOST = "127.0.0.1"
DEFAULT_API_PORT = 8080
DEFAULT_KAFKA_PORT = 9092
DEFAULT_STORE_PORT = 9094


class PortInUse(RuntimeError):
    code = "stack.port_in_use"


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def wanted_ports(settings: StackSettings, env: Mapping[str, str] | None = None) -> list[tuple[str, str, int]]:
    """(what, host, port) for every port `up` will listen on, given which engines come from the environment.
    Whoever adds a listening process adds its port here, so `up` refuses before starting anything."""
    env = os.environ if env is None else env
    ports = [("the API", settings.api_host, settings.api_port)]
    if not env.get("KAFKA_BOOTSTRAP_SERVERS"):
        ports.append(("the embedded Kafka broker (METERLINE_KAFKA_PORT)", "127.0.0.1", settings.kafka_port))
        if settings.broker_storage == "disk":
            ports.append(("the broker's disk store (METERLINE_STORE_PORT)", "127.0.0.1", settings.store_port))
    return ports


def check_ports(settings: StackSettings, env: Mapping[str, str] | None = None) -> None:
    """Refuse with the real cause when a port the stack needs is taken (before anything starts)."""
    message = busy_port_message(wanted_ports(settings, env))
    if message is not None:
        raise PortInUse(message)


def wanted_ports_from_env(env: Mapping[str, str]) -> list[tuple[str, str, int]]:
    """``wanted_ports`` from the environment alone, as pydantic-settings reads it (names case-insensitive).
    Raises ValueError on a malformed value (the full start-up then reports it)."""
    lower = {k.lower(): v for k, v in env.items()}

    def get(name: str, default: str) -> str:
        return lower.get(f"meterline_{name}", default)

    ports = [("the API", get("api_host", DEFAULT_API_HOST), int(get("api_port", str(DEFAULT_API_PORT))))]
    if not lower.get("kafka_bootstrap_servers"):
        ports.append(("the embedded Kafka broker (METERLINE_KAFKA_PORT)", "127.0.0.1",
                      int(get("kafka_port", str(DEFAULT_KAFKA_PORT)))))
        if get("broker_storage", "disk") == "disk":
            ports.append(("the broker's disk store (METERLINE_STORE_PORT)", "127.0.0.1",
                          int(get("store_port", str(DEFAULT_STORE_PORT)))))
    return ports


def busy_port_message(ports: list[tuple[str, str, int]]) -> str | None:
    """The refusal for the first busy (or doubly configured) port, None when all are free."""
    seen: dict[int, str] = {}
    for what, host, port in ports:
        if port in seen:
            return f"port {port} is configured for both {seen[port]} and {what}; give each its own port"
        seen[port] = what
        if not port_is_free(host, port):
            return (f"port {port} is in use ({host}:{port} is needed by {what}); stop whatever holds it "
                    "or choose another port")
    return None
