"""The SSE decoder on one long line without a newline: time per size (issue #12).

    python -m bench.bench_sse_linear [--old PATH/worker/upstream/sse.py]

Feeds N MiB of `data: yyyy...` in 64 KiB reads, then the line end, with the bounds
raised out of the way, and reports seconds per size; linear means the time doubles
when the size doubles. `--old` times another decoder file (e.g. main's) in the same
run, as the reference.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path
from typing import Any

READ = 64 * 1024
SIZES_MIB = (4, 8, 16, 32)


def load(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(f"sse_{abs(hash(path))}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def seconds_for(module: Any, mib: int) -> float:
    try:
        decoder = module.SSEDecoder(max_line_bytes=1 << 40, max_event_bytes=1 << 40)
    except TypeError:  # a decoder without bounds
        decoder = module.SSEDecoder()
    block = b"y" * READ
    started = time.perf_counter()
    decoder.feed(b"data: ")
    for _ in range(mib * 1024 * 1024 // READ):
        decoder.feed(block)
    events = decoder.feed(b"\n\n")
    elapsed = time.perf_counter() - started
    assert len(events) == 1 and len(events[0].data) == mib * 1024 * 1024
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_sse_linear")
    parser.add_argument("--old", type=Path, default=None)
    args = parser.parse_args()
    here = Path(__file__).resolve().parents[1] / "worker" / "upstream" / "sse.py"
    decoders = {"this tree": load(here)}
    if args.old is not None:
        decoders["--old"] = load(args.old)
    print("| decoder | " + " | ".join(f"{m} MiB" for m in SIZES_MIB) + " |")
    print("|---|" + "---|" * len(SIZES_MIB))
    for name, module in decoders.items():
        cells = [f"{seconds_for(module, m):.3f} s" for m in SIZES_MIB]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
