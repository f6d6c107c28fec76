#!/usr/bin/env python3
"""Load test of `flux-kernels serve` (issue 20): starts the server on the tiny fixture model
(loopback only, a port of its own), sends a bounded number of txt2img requests mixing LoRAs
from several concurrent clients, and reports throughput, p50/p99 latency, errors by status, and
the server's resident memory (RSS) at start, peak and end.

    python3 tools/serve_load_test.py [--requests 300] [--clients 8] [--max-seconds 300] [--json out.json]

Each request takes 0-3 LoRAs (of 8 names: the fixture LoRAs copied under several names, so
the server loads and batches them as distinct files) at random weights, a random seed, 16² or
32² px, 2-4 steps. A 503 (queue full) is counted and retried after its Retry-After, as a client
should; any other non-200 is an error. Exit status 1 when any request failed or the RSS grew
by more than --max-growth-mib from the first half of the run to the end.
"""

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

from serve_common import DEFAULT_BIN, copy_loras, start_serve, stop

NAMES = ["ink", "film", "neon", "clay", "pastel", "noir", "retro", "glow"]
SOURCES = ["lora-peft", "lora-kohya", "lora-comfy", "lora-onetrainer", "lora-peft-dora"]


def rss_mib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def percentile(values, p):
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", default=DEFAULT_BIN, help="the flux-kernels binary (cargo build first)")
    ap.add_argument("--requests", type=int, default=300, help="requests in all (at most 5000)")
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients (at most 64)")
    ap.add_argument("--max-seconds", type=float, default=300, help="stop sending after this long")
    ap.add_argument("--max-growth-mib", type=float, default=64, help="RSS growth that counts as a leak")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", help="also write the report here")
    ap.add_argument("--serve-arg", action="append", default=[], help="one more flag for serve (repeatable), e.g. --serve-arg=--no-mixed-batches")
    a = ap.parse_args()
    a.requests = max(1, min(a.requests, 5000))
    a.clients = max(1, min(a.clients, 64))
    tmp = tempfile.mkdtemp(prefix="fk-load-")
    loras = os.path.join(tmp, "loras")
    copy_loras(loras, {name: SOURCES[i % len(SOURCES)] for i, name in enumerate(NAMES)})
    server, base = start_serve(a.bin, loras, "--max-queue", "32", *a.serve_arg)
    try:

        rng = random.Random(a.seed)
        bodies = []
        for _ in range(a.requests):
            tags = " ".join(f"<lora:{n}:{rng.uniform(-1.5, 1.5):.2f}>" for n in rng.sample(NAMES, rng.randint(0, 3)))
            side = rng.choice([16, 32])
            bodies.append(json.dumps({"prompt": f"a photo {tags}", "width": side, "height": side,
                                      "steps": rng.randint(2, 4), "seed": rng.randint(0, 2**31)}).encode())
        lock = threading.Lock()
        latencies, statuses, retries = [], {}, [0]
        next_i = [0]
        deadline = time.time() + a.max_seconds
        rss = [(0.0, rss_mib(server.pid))]
        t0 = time.time()

        def client():
            while True:
                with lock:
                    if next_i[0] >= len(bodies) or time.time() > deadline:
                        return
                    body = bodies[next_i[0]]
                    next_i[0] += 1
                start = time.time()
                while True:
                    req = urllib.request.Request(base + "/sdapi/v1/txt2img", data=body, headers={"Content-Type": "application/json"})
                    try:
                        with urllib.request.urlopen(req, timeout=120) as r:
                            out = json.load(r)
                            status = r.status if out.get("images") else -1
                    except urllib.error.HTTPError as e:
                        status = e.code
                        if status == 503 and time.time() < deadline:
                            with lock:
                                retries[0] += 1
                            time.sleep(min(float(e.headers.get("Retry-After", "1")), 5))
                            continue
                    except (urllib.error.URLError, OSError) as e:
                        status = f"connection: {e}"
                    break
                with lock:
                    statuses[status] = statuses.get(status, 0) + 1
                    if status == 200:
                        latencies.append(time.time() - start)

        threads = [threading.Thread(target=client) for _ in range(a.clients)]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            time.sleep(0.2)
            rss.append((time.time() - t0, rss_mib(server.pid)))
        wall = time.time() - t0
        done = len(latencies)
        errors = sum(n for s, n in statuses.items() if s != 200)
        mem = [m for _, m in rss if m is not None]
        half = [m for t, m in rss if m is not None and t <= wall / 2] or mem
        report = {
            "serve_args": a.serve_arg,
            "requests_sent": sum(statuses.values()),
            "ok": done,
            "errors": errors,
            "statuses": {str(k): v for k, v in statuses.items()},
            "retries_after_503": retries[0],
            "clients": a.clients,
            "wall_s": round(wall, 2),
            "throughput_rps": round(done / wall, 2) if wall > 0 else None,
            "latency_p50_s": round(percentile(latencies, 50), 4) if latencies else None,
            "latency_p99_s": round(percentile(latencies, 99), 4) if latencies else None,
            "rss_start_mib": round(mem[0], 1) if mem else None,
            "rss_peak_mib": round(max(mem), 1) if mem else None,
            "rss_first_half_peak_mib": round(max(half), 1) if half else None,
            "rss_end_mib": round(mem[-1], 1) if mem else None,
        }
        health = json.load(urllib.request.urlopen(base + "/health", timeout=10))
        report["batches"] = health.get("batches_done")
        report["images"] = health.get("images_done")
        growth = (report["rss_end_mib"] or 0) - (report["rss_first_half_peak_mib"] or 0)
        report["rss_growth_second_half_mib"] = round(growth, 1)
        print(json.dumps(report, indent=2))
        if a.json:
            with open(a.json, "w") as f:
                json.dump(report, f, indent=2)
        failed = errors > 0 or growth > a.max_growth_mib
        print("load test " + ("FAILED" if failed else "passed") + f": {done} ok, {errors} errors, "
              f"{report['throughput_rps']} req/s, p50 {report['latency_p50_s']} s, p99 {report['latency_p99_s']} s, "
              f"RSS {report['rss_start_mib']} → {report['rss_end_mib']} MiB (peak {report['rss_peak_mib']})")
        return 1 if failed else 0
    finally:
        stop(server)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
