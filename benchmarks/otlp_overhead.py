"""What an unreachable OpenTelemetry collector costs the enhance function's requests.

Serves functions/enhance.py in-process (functions-framework's app, Flask's test client: no
sockets on the request path) and times N CloudEvent requests in fresh processes, one per
variant, with Ollama down (template fallback, as in the tests):

- ``baseline``: the SDK set up, no endpoint (no exporter);
- ``disabled``: ``OTEL_SDK_DISABLED=true``;
- ``refused``: an endpoint where nothing listens (connections refused);
- ``blackhole``: an endpoint that accepts connections and never answers.

Exports are made frequent (``OTEL_BSP_SCHEDULE_DELAY=100``, ``OTEL_METRIC_EXPORT_INTERVAL=500``)
so that they run while the requests do. Each round runs every variant once, starting one
variant further on than the round before. Prints each variant's mean latency per round (min
and median over the rounds) and its ratio to the baseline measured in the same run, min
against min and median against median; there is no target: it informs.

    python benchmarks/otlp_overhead.py [--requests 300] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from _cli import count, exit_on_sigterm, run_child

from imagegen.events import GENERATION_REQUESTED, PROMPT_ENHANCED

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("baseline", "disabled", "refused", "blackhole")


def measure(requests: int, warmup: int) -> dict[str, float]:
    """Time ``requests`` enhance requests in this process (the environment is set)."""
    import functions_framework

    app = functions_framework.create_app("enhance", str(ROOT / "functions" / "enhance.py"))
    client = app.test_client()
    body = json.dumps({"prompt": "a lighthouse at dusk", "width": 256, "height": 256})

    def one(i: int) -> float:
        headers = {
            "ce-specversion": "1.0",
            "ce-type": GENERATION_REQUESTED,
            "ce-source": "/benchmarks",
            "ce-id": uuid.uuid4().hex,
            "ce-subject": f"bench-{i}",
            "ce-traceparent": f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01",
            "content-type": "application/json",
        }
        started = time.perf_counter()
        response = client.post("/", data=body, headers=headers)
        elapsed = time.perf_counter() - started
        check_answer(i, response.status_code, response.headers.get("ce-type"), response.text)
        return elapsed

    for i in range(warmup):
        one(-1 - i)
    started = time.perf_counter()
    latencies = [one(i) for i in range(requests)]
    total = time.perf_counter() - started
    latencies.sort()
    return {
        "total_s": total,
        "mean_ms": 1000 * statistics.fmean(latencies),
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p95_ms": 1000 * latencies[int(len(latencies) * 0.95) - 1],
    }


def check_answer(i: int, status: int, event_type: str | None, body: str) -> None:
    """Stop the run at request ``i``'s answer unless it is an enhanced prompt.

    An event enhance refuses for the request's own reasons is answered 200 too, with a
    ``generation.failed`` event, and some times faster: timed, it would pass for a fast request.

    Raises:
        SystemExit: one line saying what came back (status, event type, body).
    """
    if status == 200 and event_type == PROMPT_ENHANCED:
        return
    said = " ".join(body.split())[:500] or "no body"
    raise SystemExit(
        f"request {i} answered {status} {event_type or 'with no event'},"
        f" not 200 {PROMPT_ENHANCED}: {said}"
    )


def run_variant(variant: str, requests: int, warmup: int, blackhole: str) -> dict[str, float]:
    """Measure one variant in a fresh process: each needs its own global providers."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "IMAGEGEN_", "K_"))}
    if variant == "disabled":
        env["OTEL_SDK_DISABLED"] = "true"
    elif variant == "refused":
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = "http://127.0.0.1:9"
    elif variant == "blackhole":
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = blackhole
    command = [
        sys.executable,
        __file__,
        "--child",
        "--requests",
        str(requests),
        "--warmup",
        str(warmup),
    ]
    with tempfile.TemporaryDirectory(prefix="otlp-bench-") as directory:
        workdir = Path(directory)
        env.update(
            IMAGEGEN_MODEL="tiny",
            IMAGEGEN_SERVED_MODELS="tiny",
            IMAGEGEN_STORAGE_URL=str(workdir / "store"),
            IMAGEGEN_OLLAMA_HOST="http://127.0.0.1:9",
            IMAGEGEN_OLLAMA_RETRIES="0",
            IMAGEGEN_LOG_LEVEL="ERROR",  # the exporters' failures are logged; keep them quiet
            OTEL_BSP_SCHEDULE_DELAY="100",
            OTEL_METRIC_EXPORT_INTERVAL="500",
        )
        started = time.perf_counter()
        done = run_child(command, env=env, cwd=workdir)
        elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{done.stderr[-4000:]}")
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_s"] = elapsed
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=count, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--rounds", type=count, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.requests, args.warmup)))
        return

    # Imported here, not at the top: the children time requests and need none of it.
    from _harness import rotated

    # A collector that hangs: the kernel accepts connections into the backlog, nobody reads.
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(1024)
        blackhole = f"http://127.0.0.1:{hole.getsockname()[1]}"
        # Rounds interleave the variants, so a slow minute of the machine hits them all, and
        # each round starts one variant further on, so none always runs first or after the
        # same one.
        rounds: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
        for round_ in range(args.rounds):
            for variant in rotated(list(VARIANTS), round_):
                rounds[variant].append(run_variant(variant, args.requests, args.warmup, blackhole))
    print(
        f"enhance: {args.requests} CloudEvent requests per variant and round, {args.rounds}"
        " rounds (Ollama down: template fallback)"
    )
    for line in table(rounds):
        print(line)


def table(rounds: dict[str, list[dict[str, float]]]) -> list[str]:
    """Each variant's figures over the rounds, and its ratio to the baseline's, as printed.

    The ratio compares the mean latency of a round: the baseline's fastest round against the
    variant's fastest (min against min), and the median rounds (median against median).
    """
    means = {variant: [r["mean_ms"] for r in runs] for variant, runs in rounds.items()}
    base = means["baseline"]
    lines = [
        f"{'variant':<10} {'mean ms min':>11} {'median':>8} {'p50 ms':>8} {'p95 ms':>8}"
        f" {'process s':>10}   ratio min / median"
    ]
    for variant, runs in rounds.items():
        mean = means[variant]
        ratio_min = min(mean) / min(base)
        ratio_median = statistics.median(mean) / statistics.median(base)
        p50, p95, process = (
            statistics.median(r[key] for r in runs) for key in ("p50_ms", "p95_ms", "process_s")
        )
        lines.append(
            f"{variant:<10} {min(mean):>11.2f} {statistics.median(mean):>8.2f} {p50:>8.2f}"
            f" {p95:>8.2f} {process:>10.1f}   {ratio_min:5.2f}x / {ratio_median:5.2f}x"
        )
    lines += [
        "mean ms: a round's mean latency, its fastest round (min) and its median round;"
        " p50, p95, process s: medians over the rounds",
        "ratio: the mean latency over the baseline's (SDK set up, no endpoint), same run;"
        " min against min, median against median; no target: it informs",
        "process s: the whole process, start-up and the bounded flush at exit included",
    ]
    return lines


if __name__ == "__main__":
    exit_on_sigterm()  # a timeout's SIGTERM kills the child, removes its directory
    main()
