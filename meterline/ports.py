"""Every port `meterline up` will listen on, checked before anything starts (light: `up --detach` checks them
before it even spawns the supervisor, so a busy port fails in well under a second)."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

from meterline.settings import StackSettings


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
    seen: dict[int, str] = {}
    for what, host, port in wanted_ports(settings, env):
        if port in seen:
            raise PortInUse(f"port {port} is configured for both {seen[port]} and {what}; give each its own port")
        seen[port] = what
        if not port_is_free(host, port):
            raise PortInUse(f"port {port} is in use ({host}:{port} is needed by {what}); stop whatever holds it "
                             "or choose another port")
