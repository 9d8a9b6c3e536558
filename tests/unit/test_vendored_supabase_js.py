"""The demo page's supabase-js ships in examples/frontend/vendor, pinned: it is the
bundle of the exact version package.json pins (and, where `npm ci` ran, the same bytes
as node_modules' copy), and the page loads it from there, not from node_modules."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FRONTEND = ROOT / "examples" / "frontend"
VENDORED = FRONTEND / "vendor" / "supabase.js"
NPM_COPY = FRONTEND / "node_modules" / "@supabase" / "supabase-js" / "dist" / "umd" / "supabase.js"


def pinned_version() -> str:
    pin = json.loads((FRONTEND / "package.json").read_text())["dependencies"][
        "@supabase/supabase-js"
    ]
    assert re.fullmatch(r"\d+\.\d+\.\d+", pin), f"not an exact pin: {pin}"
    lock = json.loads((FRONTEND / "package-lock.json").read_text())
    assert lock["packages"]["node_modules/@supabase/supabase-js"]["version"] == pin
    return str(pin)


def test_the_vendored_bundle_is_the_pinned_version() -> None:
    version = pinned_version()
    bundle = VENDORED.read_text(encoding="utf-8")
    assert bundle.startswith("var supabase=")  # the UMD build: sets window.supabase
    assert set(re.findall(r"(?:supabase|realtime|storage)-js/(\d+\.\d+\.\d+)", bundle)) == {version}
    if NPM_COPY.exists():
        assert VENDORED.read_bytes() == NPM_COPY.read_bytes(), "run `make vendor-supabase-js`"


def test_the_demo_page_loads_the_vendored_bundle() -> None:
    page = (FRONTEND / "demo.html").read_text()
    scripts = re.findall(r'<script src="([^"]+)"', page)
    assert "./vendor/supabase.js" in scripts
    assert not any("node_modules" in src for src in scripts)
