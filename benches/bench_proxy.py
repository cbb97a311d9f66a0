"""The metering proxy's cost per call (issue 14, "Numbers").

200 concurrent non-streamed chat completions against a loopback upstream
(tests/proxy_upstream.py in its own process), sent by one aiohttp client in
this process: first straight to the upstream (the baseline), then through a
real ``sigil proxy`` process that logs every call and enforces a budget. Both
runs happen here, one after the other, with the same client and upstream.

Rows (group "proxy, 200 concurrent non-streamed calls"):

* ``test_direct_200_concurrent``: p99 latency of a call straight to the upstream;
* ``test_proxy_200_concurrent``: what the proxy adds at p99 (its p99 minus the
  direct p99). Aim: under 1 ms. Its extra info also has the median difference
  and the proxy's CPU time per call (the proxy process's user + system time
  over the run, divided by the calls: what one call costs it, logging included).

Under 200 concurrent calls on a small machine every process here is CPU-bound,
so the latency difference is mostly queueing: the proxy's CPU per call times
the calls queued ahead. The CPU row is the proxy's own cost.

Group "proxy, overhead by concurrency": ``test_proxy_overhead[N]`` measures
the same difference with N = 1, 10 and 50 calls in flight (direct, then
through the proxy, in the same test), to show where the 1 ms aim holds.

Group "proxy, 200 concurrent calls to an upstream with a model's latency":
``test_proxy_200_concurrent_model_latency`` is the 200-call comparison again
with an upstream that answers after a fixed MODEL_LATENCY_S (200 ms; a real
model takes at least that), added beside the zero-latency rows, not instead of
them: with 200 calls in flight and a zero-latency upstream, a 2-core machine
is CPU-bound in every process, and the difference there measures queueing.

The proxy's transport is native (rust/proxy.rs); its CPU per call is hyper's
plus the Python policy's (admit, record: sigil.proxy.server).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from conftest import quick

pytestmark = pytest.mark.benchmark

TESTS = Path(__file__).resolve().parent.parent / "tests"
CONCURRENCY = 200
CALLS = 2_000 if quick() else 10_000
AIM_P99_OVERHEAD_MS = 1.0
#: The upstream answers after this long in the model-latency row (a model's
#: answer takes hundreds of milliseconds; the loopback upstream's takes none).
MODEL_LATENCY_S = 0.2
_UPSTREAM = (
    "import sys, time\n"
    f"sys.path.insert(0, {str(TESTS)!r})\n"
    "from proxy_upstream import Upstream\n"
    "u = Upstream(record=False, delay=float(sys.argv[1])).start()\n"
    "print(u.url, flush=True)\n"
    "time.sleep(1e9)\n"
)
BODY = orjson.dumps(
    {"model": "m", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 16}
)


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "SIGIL_"))}
    env["SIGIL_HOME"] = str(home)
    return env


@contextlib.contextmanager
def _serving(home: Path, delay: float = 0.0) -> Iterator[dict[str, str]]:
    """An upstream process (answering after ``delay`` seconds) and a ``sigil proxy``
    process in front of it, both warmed up."""
    upstream = subprocess.Popen(
        [sys.executable, "-c", _UPSTREAM, str(delay)], stdout=subprocess.PIPE, text=True,
        env=_env(home),
    )  # fmt: skip
    assert upstream.stdout is not None
    up_url = upstream.stdout.readline().strip()
    proxy = subprocess.Popen(
        [sys.executable, "-m", "sigil", "proxy", "--session", "bench", "--port", "0",
         "--budget", str(10**12), "--upstream", up_url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(home),
    )  # fmt: skip
    assert proxy.stdout is not None
    proxy_url = ""
    for line in proxy.stdout:
        if line.startswith("Proxy: "):
            proxy_url = line.split()[1]
            break
    try:
        assert proxy_url, proxy.stderr.read() if proxy.stderr else ""
        asyncio.run(_load(up_url, CONCURRENCY * 2))  # warm both up
        asyncio.run(_load(proxy_url, CONCURRENCY * 2))
        yield {"upstream": up_url, "proxy": proxy_url, "pid": str(proxy.pid)}
    finally:
        proxy.send_signal(2)
        try:
            proxy.communicate(timeout=60)
        finally:
            upstream.kill()
            upstream.wait()


@pytest.fixture(scope="module")
def endpoints(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    with _serving(tmp_path_factory.mktemp("proxy-bench")) as served:
        yield served


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _load(base: str, calls: int, concurrency: int = CONCURRENCY) -> dict[str, float]:
    """``calls`` chat completions, ``concurrency`` at a time; latency quantiles in ms."""
    import aiohttp

    latencies: list[float] = []
    per_worker = calls // concurrency
    url = base + "/chat/completions"
    headers = {"Content-Type": "application/json", "Authorization": "Bearer sk-bench"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as s:

        async def worker() -> None:
            for _ in range(per_worker):
                started = time.perf_counter()
                async with s.post(url, data=BODY, headers=headers) as r:
                    await r.read()
                    assert r.status == 200
                latencies.append((time.perf_counter() - started) * 1000)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    latencies.sort()
    q = statistics.quantiles(latencies, n=100)
    return {"p50": q[49], "p99": q[98], "wall_s": wall, "calls": len(latencies)}


_RESULTS: dict[str, dict[str, float]] = {}
GROUP = "proxy, 200 concurrent non-streamed calls"


def _direct(endpoints: dict[str, str]) -> dict[str, float]:
    if "direct" not in _RESULTS:
        _RESULTS["direct"] = asyncio.run(_load(endpoints["upstream"], CALLS))
    return _RESULTS["direct"]


def test_direct_200_concurrent(benchmark: Any, endpoints: dict[str, str]) -> None:
    """The baseline: every call straight to the upstream (time: the whole run)."""
    benchmark.group = GROUP
    benchmark.pedantic(_direct, args=(endpoints,), rounds=1)
    direct = _RESULTS["direct"]
    benchmark.extra_info.update(
        ops=direct["calls"], metric="p99 latency direct (ms)", value=direct["p99"],
        p50_ms=direct["p50"],
    )  # fmt: skip


def test_proxy_200_concurrent(benchmark: Any, endpoints: dict[str, str]) -> None:
    """The same calls through ``sigil proxy`` (time: the whole run)."""
    direct = _direct(endpoints)
    benchmark.group = GROUP
    pid = int(endpoints["pid"])

    def through_proxy() -> None:
        cpu = _cpu_seconds(pid)
        _RESULTS["proxy"] = asyncio.run(_load(endpoints["proxy"], CALLS))
        _RESULTS["proxy"]["cpu_s"] = _cpu_seconds(pid) - cpu

    benchmark.pedantic(through_proxy, rounds=1)
    proxy = _RESULTS["proxy"]
    overhead = proxy["p99"] - direct["p99"]
    per_call_ms = proxy["cpu_s"] / proxy["calls"] * 1000
    benchmark.extra_info.update(
        ops=proxy["calls"],
        baseline="test_direct_200_concurrent",
        metric="proxy overhead p99 (ms)",
        value=overhead,
        aim_max=AIM_P99_OVERHEAD_MS,
        p99_direct_ms=direct["p99"],
        p99_proxy_ms=proxy["p99"],
        p50_overhead_ms=proxy["p50"] - direct["p50"],
        proxy_cpu_ms_per_call=per_call_ms,
    )
    print(
        f"\nproxy: p99 {proxy['p99']:.2f} ms vs direct {direct['p99']:.2f} ms "
        f"(+{overhead:.2f} ms); p50 +{proxy['p50'] - direct['p50']:.2f} ms; "
        f"{per_call_ms:.3f} ms of proxy CPU per call"
    )


LOW_GROUP = "proxy, overhead by concurrency"


@pytest.mark.parametrize("concurrency", [1, 10, 50])
def test_proxy_overhead(benchmark: Any, endpoints: dict[str, str], concurrency: int) -> None:
    """Direct, then through the proxy, ``concurrency`` calls in flight."""
    benchmark.group = LOW_GROUP
    calls = concurrency * (20 if quick() else 100)
    calls = max(calls, 1_000 if quick() else 3_000)
    pid = int(endpoints["pid"])
    out: dict[str, Any] = {}

    def both() -> None:
        out["direct"] = asyncio.run(_load(endpoints["upstream"], calls, concurrency))
        cpu = _cpu_seconds(pid)
        out["proxy"] = asyncio.run(_load(endpoints["proxy"], calls, concurrency))
        out["cpu_s"] = _cpu_seconds(pid) - cpu

    benchmark.pedantic(both, rounds=1)
    direct, proxy = out["direct"], out["proxy"]
    per_call_ms = out["cpu_s"] / proxy["calls"] * 1000
    benchmark.extra_info.update(
        ops=proxy["calls"],
        metric="proxy overhead p99 (ms)",
        value=proxy["p99"] - direct["p99"],
        aim_max=AIM_P99_OVERHEAD_MS,
        p50_overhead_ms=proxy["p50"] - direct["p50"],
        p99_direct_ms=direct["p99"],
        p99_proxy_ms=proxy["p99"],
        proxy_cpu_ms_per_call=per_call_ms,
    )
    print(
        f"\nproxy x{concurrency}: p50 {proxy['p50']:.2f} vs {direct['p50']:.2f} ms "
        f"(+{proxy['p50'] - direct['p50']:.2f}); p99 {proxy['p99']:.2f} vs "
        f"{direct['p99']:.2f} ms (+{proxy['p99'] - direct['p99']:.2f}); "
        f"{per_call_ms:.3f} ms of proxy CPU per call"
    )


MODEL_GROUP = "proxy, 200 concurrent calls to an upstream with a model's latency"


def test_proxy_200_concurrent_model_latency(
    benchmark: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The 200-call row again, with an upstream that answers after
    MODEL_LATENCY_S (as a model does) instead of at once: on a small machine a
    zero-latency upstream keeps every process CPU-bound, so there the overhead
    is queueing; here the calls are spread over the model's time as real ones are."""
    benchmark.group = MODEL_GROUP
    calls = CONCURRENCY * (5 if quick() else 20)
    out: dict[str, Any] = {}
    with _serving(tmp_path_factory.mktemp("proxy-bench-slow"), MODEL_LATENCY_S) as served:
        pid = int(served["pid"])

        def both() -> None:
            out["direct"] = asyncio.run(_load(served["upstream"], calls))
            cpu = _cpu_seconds(pid)
            out["proxy"] = asyncio.run(_load(served["proxy"], calls))
            out["cpu_s"] = _cpu_seconds(pid) - cpu

        benchmark.pedantic(both, rounds=1)
    direct, proxy = out["direct"], out["proxy"]
    per_call_ms = out["cpu_s"] / proxy["calls"] * 1000
    benchmark.extra_info.update(
        ops=proxy["calls"],
        metric="proxy overhead p99 (ms)",
        value=proxy["p99"] - direct["p99"],
        aim_max=AIM_P99_OVERHEAD_MS,
        upstream_latency_ms=MODEL_LATENCY_S * 1000,
        p50_overhead_ms=proxy["p50"] - direct["p50"],
        p99_direct_ms=direct["p99"],
        p99_proxy_ms=proxy["p99"],
        proxy_cpu_ms_per_call=per_call_ms,
    )
    print(
        f"\nproxy x{CONCURRENCY}, upstream latency {MODEL_LATENCY_S * 1000:g} ms: p50 "
        f"{proxy['p50']:.2f} vs {direct['p50']:.2f} ms (+{proxy['p50'] - direct['p50']:.2f}); "
        f"p99 {proxy['p99']:.2f} vs {direct['p99']:.2f} ms "
        f"(+{proxy['p99'] - direct['p99']:.2f}); {per_call_ms:.3f} ms of proxy CPU per call"
    )
