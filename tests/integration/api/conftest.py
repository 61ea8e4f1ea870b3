"""The api integration tests live in one folder per domain (tenancy/, wallets/, access/, payments/, ingest/);
the test kits they share (tenancy_testkit, payments_testkit, ingest_testkit) stay here, and this folder is put
on ``sys.path`` so ``from tenancy_testkit import …`` works from every domain folder (as the SDK test does)."""

from __future__ import annotations

import sys
from pathlib import Path

_KITS = str(Path(__file__).resolve().parent)
if _KITS not in sys.path:
    sys.path.insert(0, _KITS)
