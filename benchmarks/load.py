"""Load and memory: does a real `deepaas-run` hold concurrent clients, and does its memory stay flat?

N client threads (one requests.Session each) share M requests against `deepaas-run` on 127.0.0.1,
once per `--workers` count. Most requests are valid predictions (a JPEG seed photo of the run's test
split); the rest are invalid (bytes that are no image, a top_k out of range, an unknown run) and must
be refused with a 4xx. A request is held when it gets the expected answer; anything else (a 5xx, a
wrong status or body, a timeout, a refused connection) is a failure, and the goal is none.
Memory is the resident set (VmRSS) summed over the server and all its descendants (the worker pools),
read at rest after 100 and after 1000 requests: a leak per request shows as growth between the two.

    .venv/bin/python benchmarks/load.py [--requests 1000] [--clients 8] [--workers 1 2] [--run RUN_ID]

Uses SEEDS_TF_MODELS_DIR / SEEDS_TF_DATA_DIR like the service (the demo run of `make serve` by default:
`seeds-tf demo` makes it). Loopback only. Writes its figures into benchmarks/results.json under "load".
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import io
import itertools
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import PIL.Image
import psutil
import requests

# The server is started by the tests' harness (one way to start it, in one place); run as a script,
# only benchmarks/ is on the path.
REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))

from seeds_tf.core import runs  # noqa: E402
from seeds_tf.core.paths import DATA_ENV, MODELS_ENV, Roots  # noqa: E402
from tests.deepaas_harness import MODEL_URL, deepaas_process  # noqa: E402

MIX = ("predict", "predict", "not_an_image", "predict", "bad_top_k", "predict", "unknown_run", "predict")
"""Request kinds in the order they are sent, cycled: 5 valid predictions in 8 requests."""

REFUSED_FIELD = {"not_an_image": "image", "bad_top_k": "top_k", "unknown_run": "timestamp"}
"""The field each invalid kind's 4xx must name: a refusal for another reason is no answer to it."""

TOP_K = 3
UNKNOWN_RUN = "1999-01-01_000000"
CHECKPOINTS = (100, 1000)
"""Request counts after which the server's memory is read."""


@dataclasses.dataclass(frozen=True)
class Target:
    """What the clients send and what a valid prediction must answer."""

    url: str
    run_id: str
    photo: bytes
    species_expected: int
    timeout_s: float = 120


@dataclasses.dataclass
class Tally:
    """Outcomes of all requests of one server, added to by every client thread."""

    sent: int = 0
    held: int = 0
    problems: list[str] = dataclasses.field(default_factory=list)
    predict_latencies_s: list[float] = dataclasses.field(default_factory=list)
    statuses: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def add(self, kind: str, status: int | str, latency_s: float, problem: str | None) -> None:
        with self.lock:
            self.sent += 1
            self.statuses[f"{kind} {status}"] += 1
            if problem is None:
                self.held += 1
            else:
                self.problems.append(f"{kind}: {problem}")
            if kind == "predict" and problem is None:
                self.predict_latencies_s.append(latency_s)

    @property
    def failures(self) -> int:
        return len(self.problems)


def load_target(url: str, roots: Roots, run_id: str) -> Target:
    """The run's first test image as a JPEG, and the number of species its predictions list."""
    layout = runs.resolve_run(roots.models, run_id)
    training = layout.config().training
    images_dir = roots.data_path(training.images_directory, "images_directory")
    first = (layout.dataset_dir / "test.txt").read_text().splitlines()[0]
    photo = (images_dir / first.rsplit(" ", 1)[0]).read_bytes()
    if not photo.startswith(b"\xff\xd8"):
        buffer = io.BytesIO()
        PIL.Image.open(io.BytesIO(photo)).convert("RGB").save(buffer, format="JPEG", quality=90)
        photo = buffer.getvalue()
    classes = len(layout.classes())
    return Target(url, layout.run_id, photo, min(TOP_K, classes))


def request_for(kind: str, target: Target) -> dict[str, Any]:
    """The multipart form of one request kind (keyword arguments of Session.post)."""
    form = {"top_k": str(TOP_K), "timestamp": target.run_id}
    photo = ("seed.jpg", target.photo, "image/jpeg")
    if kind == "not_an_image":
        photo = ("seed.jpg", b"these bytes are no image at all\n" * 8, "image/jpeg")
    elif kind == "bad_top_k":
        form["top_k"] = "0"
    elif kind == "unknown_run":
        form["timestamp"] = UNKNOWN_RUN
    return {"files": {"image": photo}, "data": form}


def check(kind: str, response: requests.Response, target: Target) -> str | None:
    """None when the answer is the expected one, else what is wrong with it."""
    if kind == "predict":
        return _check_prediction(response, target)
    if not 400 <= response.status_code < 500:
        return f"status {response.status_code}, want 4xx"
    if REFUSED_FIELD[kind] not in response.text:
        return f"refused for another reason: {response.text[:200]!r}"
    return None


def _check_prediction(response: requests.Response, target: Target) -> str | None:
    if response.status_code != 200:
        return f"status {response.status_code}: {response.text[:200]!r}"
    body = response.json()
    species = body["results"][0]["species"] if len(body.get("results", [])) == 1 else []
    probabilities = [entry["probability"] for entry in species]
    if body.get("run_id") != target.run_id or len(species) != target.species_expected:
        return f"unexpected body {str(body)[:200]!r}"
    if probabilities != sorted(probabilities, reverse=True):
        return f"species not sorted by probability: {probabilities}"
    return None


def send(session: requests.Session, kind: str, target: Target, tally: Tally) -> None:
    """One request, its latency and its outcome; transport errors are failures, never raised."""
    started = time.perf_counter()
    try:
        response = session.post(
            f"{target.url}{MODEL_URL}/predict/", timeout=target.timeout_s, **request_for(kind, target)
        )
    except requests.RequestException as error:
        tally.add(kind, type(error).__name__, time.perf_counter() - started, repr(error)[:200])
        return
    latency = time.perf_counter() - started
    try:
        problem = check(kind, response, target)
    except (ValueError, KeyError, TypeError, IndexError) as error:
        problem = f"malformed body ({error!r}): {response.text[:200]!r}"
    tally.add(kind, response.status_code, latency, problem)


def run_clients(
    sessions: Sequence[requests.Session], target: Target, kinds: Sequence[str], tally: Tally
) -> None:
    """Sends one request of each of `kinds` in order, from one thread per session, each thread sending
    its next request as soon as its last one is answered."""
    queue = iter(kinds)
    lock = threading.Lock()

    def client(session: requests.Session) -> None:
        while True:
            with lock:
                kind = next(queue, None)
            if kind is None:
                return
            send(session, kind, target, tally)

    threads = [threading.Thread(target=client, args=(session,)) for session in sessions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def mix(begin: int, end: int) -> list[str]:
    """Requests `begin` to `end - 1` of the cycled MIX."""
    return [MIX[index % len(MIX)] for index in range(begin, end)]


def tree_rss_mib(pid: int) -> float:
    """Resident memory of `pid` and its descendants (each one's RSS, so shared pages count once
    per process)."""
    server = psutil.Process(pid)
    members = [server, *server.children(recursive=True)]
    total = 0
    for member in members:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += member.memory_info().rss
    return round(total / 2**20, 1)


@contextlib.contextmanager
def serving(env: dict[str, str], log: Path, workers: int) -> Iterator[tuple[str, int]]:
    """`deepaas-run --workers <workers>` on loopback with `env`: its URL and PID."""
    with deepaas_process(env, log, "--workers", str(workers), timeout=300) as (url, pid):
        yield url, pid


def load_run(
    target: Target, pid: int, clients: int, total: int, checkpoints: Sequence[int] = CHECKPOINTS
) -> tuple[Tally, Tally, dict[int, float], float]:
    """Sends `total` requests from `clients` threads, reading the server's memory at rest at each
    checkpoint.

    First, one valid prediction per client, counted apart: a worker's first predictions also trace
    the model, which is a start-up cost rather than the latency under load.
    Returns the warm-up's and the load's tallies, the memory readings by request count and the
    seconds the load took.
    """
    marks = sorted({mark for mark in checkpoints if mark < total} | {total})
    sessions = [requests.Session() for _ in range(clients)]
    warmup, tally = Tally(), Tally()
    try:
        run_clients(sessions, target, ["predict"] * clients, warmup)
        rss = {0: tree_rss_mib(pid)}
        started = time.perf_counter()
        for begin, end in itertools.pairwise([0, *marks]):
            run_clients(sessions, target, mix(begin, end), tally)
            rss[end] = tree_rss_mib(pid)
        seconds = time.perf_counter() - started
    finally:
        for session in sessions:
            session.close()
    return warmup, tally, rss, seconds


def summarise(
    warmup: Tally, tally: Tally, rss: dict[int, float], seconds: float, workers: int
) -> dict[str, Any]:
    """The figures of one worker count."""
    latencies_ms = sorted(1000 * s for s in tally.predict_latencies_s)
    quantiles = statistics.quantiles(latencies_ms, n=100, method="inclusive") if len(latencies_ms) > 1 else []
    first = min((n for n in rss if n >= CHECKPOINTS[0]), default=None)
    last = max(rss)
    return {
        "workers": workers,
        "warmup_sent": warmup.sent,
        "warmup_failures": warmup.failures,
        "warmup_max_ms": round(1000 * max(warmup.predict_latencies_s, default=0), 1),
        "sent": tally.sent,
        "held": tally.held,
        "failures": tally.failures,
        "first_problems": (warmup.problems + tally.problems)[:5],
        "statuses": dict(sorted(tally.statuses.items())),
        "seconds": round(seconds, 1),
        "requests_per_s": round(tally.sent / seconds, 1),
        "predict_p50_ms": round(quantiles[49], 1) if quantiles else None,
        "predict_p99_ms": round(quantiles[98], 1) if quantiles else None,
        "predict_max_ms": round(latencies_ms[-1], 1) if latencies_ms else None,
        "rss_mib_after": {str(n): mib for n, mib in rss.items()},
        "rss_growth_mib": round(rss[last] - rss[first], 1) if first is not None and last > first else None,
        "rss_growth_between": [first, last] if first is not None and last > first else None,
    }


def uploads_left(folder: Path) -> list[str]:
    """Files left in the server's TMPDIR, where DEEPaaS writes each upload: a leak unless predict
    deletes them. TensorFlow's autograph sources are written there too, and are not uploads."""
    return [path.name for path in folder.iterdir() if not path.name.startswith("__autograph_generated_file")]


def measure(
    roots: Roots, run_id: str, workers: int, *, clients: int, total: int, logs: Path
) -> dict[str, Any]:
    """Starts `deepaas-run --workers <workers>` on loopback, loads it, stops it; its figures."""
    uploads = logs / f"uploads_{workers}"
    uploads.mkdir()
    env = {DATA_ENV: str(roots.data), MODELS_ENV: str(roots.models), "TMPDIR": str(uploads)}
    log = logs / f"server_{workers}.log"
    with serving(env, log, workers) as (url, pid):
        target = load_target(url, roots, run_id)
        warmup, tally, rss, seconds = load_run(target, pid, clients, total)
    figures = {"run_id": target.run_id, **summarise(warmup, tally, rss, seconds, workers)}
    figures["uploads_left"] = len(uploads_left(uploads))
    if warmup.failures or tally.failures:
        print(f"--- workers={workers}: {warmup.failures + tally.failures} failures; end of the server log:")
        print("\n".join(log.read_text(errors="replace").splitlines()[-40:]))
    return figures


COLUMNS = (
    ("workers", lambda f: f["workers"]),
    ("warm-up ms", lambda f: f["warmup_max_ms"]),
    ("sent", lambda f: f["sent"]),
    ("held", lambda f: f["held"]),
    ("failures", lambda f: f["failures"]),
    ("req/s", lambda f: f["requests_per_s"]),
    ("p50 ms", lambda f: f["predict_p50_ms"]),
    ("p99 ms", lambda f: f["predict_p99_ms"]),
    ("RSS@100 MiB", lambda f: f["rss_mib_after"].get("100", "-")),
    ("RSS@1000 MiB", lambda f: f["rss_mib_after"].get("1000", "-")),
    ("growth MiB", lambda f: f["rss_growth_mib"]),
)
"""The columns of the final table: heading, and how to read it from one worker count's figures."""


def table(all_figures: Sequence[dict[str, Any]]) -> str:
    """The figures of each worker count, one line each."""
    widths = [max(len(heading), 8) for heading, _ in COLUMNS]
    lines = [" ".join(f"{heading:>{width}}" for (heading, _), width in zip(COLUMNS, widths, strict=True))]
    lines.append("-" * len(lines[0]))
    for figures in all_figures:
        cells = (str(read(figures)) for _, read in COLUMNS)
        lines.append(" ".join(f"{cell:>{width}}" for cell, width in zip(cells, widths, strict=True)))
    return "\n".join(lines)


def main() -> int:
    from results import record  # benchmarks/ is on the path only when run as a script

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=1000, help="requests per worker count")
    parser.add_argument("--clients", type=int, default=8, help="concurrent client threads")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="deepaas-run --workers")
    parser.add_argument("--run", default="", help="run id; the newest complete run by default")
    args = parser.parse_args()

    roots = Roots.from_env()
    run_id = runs.resolve_run(roots.models, args.run).run_id
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="seeds_tf_load_") as logs:
        results = [
            measure(roots, run_id, n, clients=args.clients, total=args.requests, logs=Path(logs))
            for n in args.workers
        ]
    wall = round(time.perf_counter() - started, 1)
    record(
        "load",
        {
            "run_id": run_id,
            "clients": args.clients,
            "requests_per_worker_count": args.requests,
            "mix": list(MIX),
            "wall_s": wall,
            **{f"workers_{figures['workers']}": figures for figures in results},
        },
    )
    print(table(results))
    print(f"wall time {wall} s")
    return 1 if any(figures["failures"] or figures["warmup_failures"] for figures in results) else 0


if __name__ == "__main__":
    sys.exit(main())
