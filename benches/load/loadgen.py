#!/usr/bin/env python3
"""Concurrent HTTP/1.1 client for benches/load/compare.sh (standard library only).

  loadgen.py stampede --port P --auth KEY --prefix PATH --keys N --requests M [--first F]
      Opens M connections first, then sends M first requests at once (request i asks
      for PATH + str(F + i % N): N = M gives M distinct keys, N = 1 one key) and
      reports latency percentiles and the Cache-Status kinds seen.
  loadgen.py fill --port P --auth KEY --prefix PATH --keys N --conns C [--first F]
      Requests PATH + str(F) .. PATH + str(F + N - 1) once each over C keep-alive
      connections, and reports the body bytes received.

Prints one JSON object on stdout.
"""

import argparse
import asyncio
import json
import sys
import time

HOST = "127.0.0.1"


async def read_response(reader):
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = bytearray()
        while True:
            size = int((await reader.readline()).split(b";")[0].strip(), 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            body += await reader.readexactly(size)
            await reader.readexactly(2)
        body = bytes(body)
    else:
        n = int(headers.get("content-length", "0"))
        body = await reader.readexactly(n) if n else b""
    return status, headers, body


def request_bytes(path, auth):
    lines = [f"GET {path} HTTP/1.1", f"Host: {HOST}"]
    if auth:
        lines.append(f"Authorization: Bearer {auth}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def pct(sorted_values, p):
    if not sorted_values:
        return None
    k = min(len(sorted_values) - 1, max(0, int(round(p / 100.0 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[k]


def cache_kind(value):
    if not value:
        return "none"
    if "collapsed" in value:
        return "collapsed"
    if "fwd=miss" in value:
        return "miss"
    if "; hit" in value:
        return "hit"
    return value.split(";")[1].strip() if ";" in value else value


async def connect(port, sem):
    async with sem:
        for attempt in range(20):
            try:
                return await asyncio.open_connection(HOST, port)
            except OSError:
                await asyncio.sleep(0.05 * (attempt + 1))
        return await asyncio.open_connection(HOST, port)


async def stampede(args):
    sem = asyncio.Semaphore(256)  # connection setup only; the requests all go at once
    conns = await asyncio.gather(*(connect(args.port, sem) for _ in range(args.requests)))
    go = asyncio.Event()
    latencies = [0.0] * args.requests
    statuses = {}
    kinds = {}
    body_sizes = set()

    async def one(i, reader, writer):
        data = request_bytes(f"{args.prefix}{args.first + i % args.keys}", args.auth)
        await go.wait()
        t0 = time.perf_counter()
        writer.write(data)
        status, headers, body = await read_response(reader)
        latencies[i] = (time.perf_counter() - t0) * 1000.0
        statuses[status] = statuses.get(status, 0) + 1
        k = cache_kind(headers.get("cache-status"))
        kinds[k] = kinds.get(k, 0) + 1
        body_sizes.add(len(body))
        writer.close()

    tasks = [asyncio.create_task(one(i, r, w)) for i, (r, w) in enumerate(conns)]
    await asyncio.sleep(0.2)  # every task is parked on the barrier
    t0 = time.perf_counter()
    go.set()
    await asyncio.gather(*tasks)
    wall = (time.perf_counter() - t0) * 1000.0
    lat = sorted(latencies)
    return {
        "requests": args.requests,
        "distinct_keys": args.keys,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "cache_status": kinds,
        "body_sizes": sorted(body_sizes),
        "wall_ms": round(wall, 1),
        "p50_ms": round(pct(lat, 50), 2),
        "p99_ms": round(pct(lat, 99), 2),
        "max_ms": round(lat[-1], 2),
    }


async def fill(args):
    next_key = iter(range(args.first, args.first + args.keys))
    statuses = {}
    totals = {"bytes": 0, "done": 0}
    sem = asyncio.Semaphore(args.conns)

    async def worker():
        reader, writer = await connect(args.port, sem)
        for i in next_key:
            path = f"{args.prefix}{i}"
            for attempt in range(3):
                try:
                    writer.write(request_bytes(path, args.auth))
                    status, _, body = await read_response(reader)
                    break
                except (OSError, asyncio.IncompleteReadError):
                    writer.close()
                    reader, writer = await connect(args.port, sem)
            else:
                status, body = 0, b""
            statuses[status] = statuses.get(status, 0) + 1
            if status == 200:
                totals["bytes"] += len(body)
                totals["done"] += 1
        writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(args.conns)))
    wall = time.perf_counter() - t0
    ok = totals["done"]
    return {
        "requests": args.keys,
        "ok": ok,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "body_bytes_total": totals["bytes"],
        "body_bytes_mean": round(totals["bytes"] / ok, 1) if ok else None,
        "seconds": round(wall, 2),
        "requests_per_s": round(args.keys / wall, 1) if wall else None,
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["stampede", "fill"])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--auth", default="")
    p.add_argument("--prefix", required=True)
    p.add_argument("--keys", type=int, required=True)
    p.add_argument("--first", type=int, default=0, help="number of the first key")
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--conns", type=int, default=200)
    args = p.parse_args()
    result = asyncio.run(stampede(args) if args.mode == "stampede" else fill(args))
    json.dump(result, sys.stdout)
    print()


if __name__ == "__main__":
    main()
