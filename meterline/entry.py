"""The `meterline` command's entry point (console script and ``python -m meterline``).

`meterline up` checks its ports here, before the CLI's imports (seconds on a loaded machine): a busy port is
named at once and nothing is started. Everything else goes straight to ``meterline.cli``."""

from __future__ import annotations

import os
import sys


def main() -> None:
    if sys.argv[1:2] == ["up"]:
        from meterline.ports import busy_port_message, wanted_ports_from_env

        try:
            message = busy_port_message(wanted_ports_from_env(os.environ))
        except ValueError:  # a malformed port: the full start-up reports it with the setting's name
            message = None
        if message is not None:
            print(f"error: {message}", file=sys.stderr)
            raise SystemExit(1)
    from meterline.cli import main as cli_main

    cli_main()
