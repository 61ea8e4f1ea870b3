"""The README's quickstart, pasted as a user would: the blocks marked ``<!-- readme-test -->`` are taken from
README.md itself (no copy lives here), run in ONE bash shell against a fresh running stack (``meterline up`` on
free ports in a new home), twice. The second run must log in instead of signing up, reuse the project, and charge only the new usage.
The charge is checked against the ledger through the API: 0.4 credit per token after 1,000 free tokens."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from decimal import ROUND_FLOOR, Decimal
from pathlib import Path

import httpx
import pytest

from meterline.services import free_port

pytestmark = pytest.mark.integration

README = Path(__file__).resolve().parents[2] / "README.md"
MARK = "<!-- readme-test -->"
_BLOCK = re.compile(re.escape(MARK) + r"\s*\n```(bash|python)\n(.*?)\n```", re.S)
TOKENS_PER_RUN = 1500 + 700 + 1234 + 5  # the curl event, the JSON line, the SDK's track and its Kafka event


def readme_blocks(text: str) -> list[tuple[str, str]]:
    """(language, code) of every marked block, in README order."""
    return [(m.group(1), m.group(2)) for m in _BLOCK.finditer(text)]


def quickstart_script(text: str) -> str:
    lines = ["set -euo pipefail"]
    for language, code in readme_blocks(text):
        if language == "bash":
            lines.append(code)
        else:  # the SDK snippet, in the same environment the shell blocks exported
            lines.append(f"python - <<'README_PYTHON'\n{code}\nREADME_PYTHON")
    lines.append('echo "QUICKSTART $P $W"')
    return "\n".join(lines) + "\n"


def test_the_readme_marks_the_quickstart_blocks() -> None:
    blocks = readme_blocks(README.read_text())
    assert [language for language, _ in blocks] == ["bash", "bash", "bash", "bash", "python"]
    script = "\n".join(code for _, code in blocks)
    for needed in ("auth/login", "auth/signup", "METERLINE_API_PORT", "cloudevents+json", "events send",
                   "/transactions", "METERLINE_API_KEY"):
        assert needed in script, needed


@pytest.fixture
def stack_home() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="meterline-readme-test-"))
    root.chmod(0o755)  # the embedded PostgreSQL may run as another user, who must traverse the path
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _price(tokens: int) -> int:
    return int((Decimal("0.4") * max(tokens - 1000, 0)).to_integral_value(ROUND_FLOOR))


def test_readme_quickstart_runs_twice_against_a_fresh_stack(stack_home: Path) -> None:
    bin_dir = str(Path(sys.executable).parent)  # `meterline` and `python` of this environment
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS", "CLICKHOUSE_URL", "METERLINE_TOPIC_PREFIX")}
    env.update({"PATH": f"{bin_dir}:{env.get('PATH', '')}", "METERLINE_HOME": str(stack_home / "home"),
                "METERLINE_API_PORT": str(free_port()), "METERLINE_KAFKA_PORT": str(free_port()),
                "METERLINE_STORE_PORT": str(free_port()), "METERLINE_STREAMS_WORKERS": "1"})
    script = quickstart_script(README.read_text())
    work = stack_home / "work"
    work.mkdir()
    api = f"http://127.0.0.1:{env['METERLINE_API_PORT']}/api/v1"
    try:
        # the stack runs before the blocks do (the README's `meterline status || meterline up` then finds it):
        # `up`'s default 60 s health wait is too short on a loaded CI machine
        started = subprocess.run([sys.executable, "-m", "meterline", "up", "--detach", "--timeout-s", "180"],
                                 env=env, capture_output=True, text=True, timeout=240)
        assert started.returncode == 0, started.stdout + started.stderr
        outputs = []
        for run in (1, 2):
            done = subprocess.run(["bash", "-c", script], cwd=work, env=env, capture_output=True, text=True,
                                  timeout=240)
            assert done.returncode == 0, f"run {run}:\n{done.stdout}\n{done.stderr}"
            outputs.append(done.stdout)
            project, wallet = re.findall(r"^QUICKSTART (\S+) (\S+)$", done.stdout, re.M)[-1]
            assert project.startswith("prj_") and wallet not in ("", "null")
            login = httpx.post(f"{api}/auth/login", json={"email": "me@example.com", "password": "a long passphrase"})
            headers = {"Authorization": f"Bearer {login.json()['access_token']}"}
            expected = 100_000 - _price(run * TOKENS_PER_RUN)
            deadline = time.monotonic() + 60
            balance = None
            while time.monotonic() < deadline:
                balance = httpx.get(f"{api}/projects/{project}/wallets/{wallet}", headers=headers).json()["balance"]
                if balance["available_minor"] == expected:
                    break
                time.sleep(0.5)
            assert balance is not None and balance["available_minor"] == expected, (run, balance, done.stdout)
        me = httpx.get(f"{api}/auth/me", headers=headers).json()
        assert [p["project_name"] for p in me["projects"]] == ["Acme"]  # the second run reused it
        assert "HTTP 204" in outputs[0] or "HTTP 202" in outputs[0]
        grants = [re.findall(r'^\{"transaction_id":(\d+),', out, re.M) for out in outputs]
        assert grants[0] and grants[0] == grants[1]  # the same top-up replayed, not a second one
    finally:
        subprocess.run([sys.executable, "-m", "meterline", "down"], env=env, capture_output=True, timeout=120)
