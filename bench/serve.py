"""Serving throughput and latency: `lmlab serve`'s continuous batching vs the same engine
serving one request at a time (max_batch 1), for 1, 8 and 32 concurrent streaming clients
on loopback, on the micro preset (~8.5M parameters) with random weights.

    python bench/serve.py [--quick] [--new-tokens 64] [--requests-per-client 2]

The server runs in a child process (so client parsing does not share its GIL); clients are
raw asyncio HTTP/1.1 connections reading the SSE stream. Reported per run: generated tokens
per second over the wall time, p50/p99 request latency and p50/p99 time to first token.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import time


class IdTokenizer:
    """Token ids as text ("<17>"): every id of a random model decodes, and no EOS ends a
    request early, so both modes generate exactly the same number of tokens."""

    bos_id = eos_id = pad_id = None

    def __init__(self, vocab: int) -> None:
        self.vocab_size = vocab

    def token_to_id(self, token):
        return None

    def encode(self, text, add_bos=False, add_eos=False):
        return [int(t) for t in text.replace("<", " ").replace(">", " ").split()]

    def decode(self, ids):
        return "".join(f"<{i}>" for i in ids)


def run_server(port: int, max_batch: int, threads: int) -> None:
    import torch

    from lmlab.config import get_preset
    from lmlab.model import build_model
    from lmlab.serve.app import ServeConfig, create_app
    from lmlab.serve.server import build_server

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = get_preset("micro")
    model = build_model(cfg).eval()
    app = create_app(model, IdTokenizer(cfg.vocab_size),
                     ServeConfig(model_name="micro", max_batch=max_batch, max_queue=1024))
    build_server(app, "127.0.0.1", port, "warning").run()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def one_request(port: int, prompt: list[int], new_tokens: int) -> tuple[float, float, int]:
    """(latency, time to first token, tokens) of one streaming completion."""
    body = json.dumps({"model": "micro", "prompt": prompt, "max_tokens": new_tokens, "temperature": 0,
                       "stream": True}).encode()
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
    await writer.drain()
    status = await reader.readline()
    if b" 200 " not in status:
        raise RuntimeError(f"server answered {status!r}")
    first, tokens = None, 0
    while True:
        line = await reader.readline()
        if not line:
            break
        if not line.startswith(b"data: "):
            continue
        if line.startswith(b"data: [DONE]"):
            break
        choices = json.loads(line[6:])["choices"]
        if choices and choices[0]["finish_reason"] is None:
            tokens += 1
            if first is None:
                first = time.perf_counter() - start
    writer.close()
    return time.perf_counter() - start, first or 0.0, tokens


async def load(port: int, clients: int, per_client: int, new_tokens: int, prompt_len: int, vocab: int):
    rng = random.Random(clients)

    async def client() -> list[tuple[float, float, int]]:
        out = []
        for _ in range(per_client):
            prompt = [rng.randrange(vocab) for _ in range(prompt_len)]
            out.append(await one_request(port, prompt, new_tokens))
        return out

    start = time.perf_counter()
    results = [r for rs in await asyncio.gather(*(client() for _ in range(clients))) for r in rs]
    wall = time.perf_counter() - start
    return wall, results


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def wait_healthy(port: int, proc, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the server process exited")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if b" 200 " in s.recv(100):
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the server did not become healthy")


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer, shorter requests (< 60 s)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the server")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--_serve", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._serve:
        run_server(args._serve[0], args._serve[1], args.threads)
        return
    if args.quick:
        args.new_tokens, args.requests_per_client = 32, 1
    levels = [int(c) for c in args.clients.split(",")]
    vocab = 8192
    print(f"CPU: {cpu_model()} ({os.cpu_count()} cores), python {platform.python_version()}, "
          f"server torch threads {args.threads}")
    print(f"micro preset, random weights; prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, "
          f"greedy, streaming; {args.requests_per_client} request(s) per client")
    header = (f"{'mode':<12} {'clients':>7} {'tok/s':>8} {'p50 lat s':>9} {'p99 lat s':>9} "
              f"{'p50 ttft s':>10} {'p99 ttft s':>10}")
    print(header)
    table: dict[tuple[str, int], float] = {}
    for mode, max_batch in (("continuous", args.max_batch), ("one-at-a-time", 1)):
        port = free_port()
        proc = subprocess.Popen([sys.executable, __file__, "--_serve", str(port), str(max_batch),
                                 "--threads", str(args.threads)])
        try:
            wait_healthy(port, proc)
            asyncio.run(load(port, 1, 1, 4, args.prompt_len, vocab))  # warm-up
            for clients in levels:
                wall, results = asyncio.run(load(port, clients, args.requests_per_client, args.new_tokens,
                                                 args.prompt_len, vocab))
                tokens = sum(r[2] for r in results)
                lat, ttft = [r[0] for r in results], [r[1] for r in results]
                tps = tokens / wall
                table[(mode, clients)] = tps
                print(f"{mode:<12} {clients:>7} {tps:>8.1f} {statistics.median(lat):>9.3f} {pct(lat, 0.99):>9.3f} "
                      f"{statistics.median(ttft):>10.3f} {pct(ttft, 0.99):>10.3f}", flush=True)
        finally:
            proc.terminate()
            proc.wait(10)
    for clients in levels:
        ratio = table[("continuous", clients)] / table[("one-at-a-time", clients)]
        print(f"throughput ratio at {clients} clients: {ratio:.2f}x continuous / one-at-a-time")


if __name__ == "__main__":
    main()
