"""Time to first event of a lone SSE stream, direct vs through fastgate, nothing else running.

    python bench/sse_lone.py [--rounds 3] [--streams 100]

Starts bench/sse_upstream.py (core 1) and `fastgate run` with one worker (core 0); each round
measures `streams` streams one after the other on a blocking socket (bench/e2e.py's
run_sse(..., one_at_a_time=True)) straight to the upstream and through the gateway, and prints
the p50s side by side.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench.e2e import GATEWAY, SSE_PORT, free_port, pinned, run_sse, start, stop, wait_port  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--streams", type=int, default=100)
    args = parser.parse_args()
    run_dir = Path(tempfile.mkdtemp(prefix="fastgate-sse-"))
    upstream = start(pinned(1, [sys.executable, str(HERE / "sse_upstream.py"), str(SSE_PORT)]))
    port, admin = free_port(), free_port()
    (run_dir / "gateway.yaml").write_text(GATEWAY.format(json_port=SSE_PORT, sse_port=SSE_PORT))
    env = dict(os.environ, FASTGATE_WORKERS="1", FASTGATE_PROXY_LISTEN=f"127.0.0.1:{port}",
               FASTGATE_ADMIN_LISTEN=f"127.0.0.1:{admin}", FASTGATE_LOG_LEVEL="warning")
    gateway = start(pinned(0, [sys.executable, "-m", "fastgate", "run", "--config", str(run_dir / "gateway.yaml")]),
                    env=env)
    try:
        wait_port(SSE_PORT)
        wait_port(port)
        run_sse(port, 10, events=5, one_at_a_time=True)  # warm-up: the upstream pool holds a connection
        print("| round | direct TTFE p50 ms | fastgate TTFE p50 ms | added ms |\n|---:|---:|---:|---:|")
        for index in range(args.rounds):
            direct = run_sse(SSE_PORT, args.streams, events=5, one_at_a_time=True)["ttfe_p50_ms"]
            through = run_sse(port, args.streams, events=5, one_at_a_time=True)["ttfe_p50_ms"]
            print(f"| {index + 1} | {direct:.3f} | {through:.3f} | {through - direct:+.3f} |")
    finally:
        stop(gateway)
        stop(upstream)
        shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
