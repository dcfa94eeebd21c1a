#!/usr/bin/env python
"""Benchmark the teacher client (the `openai` backend's session, what
`tools/generate_sft_data.py` sends its requests through) against a loopback
OpenAI-compatible server that answers every request after a fixed delay.

Reports requests/s at each concurrency and the client's own CPU time per request (process
CPU time of the client process, which runs nothing else). The server runs in a separate
process so that its CPU time is not counted as the client's. With a 50 ms delay the
ideal rate is concurrency / 0.05 s; the target is >= 500 requests/s at 256 on 2 cores,
so that the client is never what limits a vLLM server.

    python bench/synth_client.py                      # concurrency 1 16 64 256, 50 ms
    python bench/synth_client.py --concurrency 256 --requests 4096 --out bench_synth.jsonl
    python bench/synth_client.py --pipeline-samples 2000   # + the whole generator at 256
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_kaja.inference import GenerationRequest, build_backend

# Teacher-sized replies written for the benchmark (no third-party text).
KANA = "あいうえおかきくけこさしすせそたちつてとなにぬねのはひふへほまみむめも"
ANSWER = "A: 回答できません。その理由は、周りの人の迷惑になり、トラブルの原因になるからです。"


def serve(delay_s: float) -> None:
    """Run the scripted server until stdin closes; print its base URL first. Question
    prompts get a distinct question per request seed (so that the pipeline mode's dedup
    keeps them), answer prompts a fixed answer."""
    import random

    from megatron_kaja.inference.testing import ScriptedOpenAIServer, ScriptedReply

    def reply(body: dict) -> ScriptedReply:
        if "参考質問:" in body["messages"][0]["content"]:
            rng = random.Random(body.get("seed"))
            question = "Q: " + "".join(rng.choices(KANA, k=30)) + "ですか？"
            return ScriptedReply(text=question, delay_s=delay_s)
        return ScriptedReply(text=ANSWER, delay_s=delay_s)

    with ScriptedOpenAIServer(responder=reply, model="bench-teacher") as server:
        print(server.base_url, flush=True)
        sys.stdin.read()


def run_pipeline(base_url: str, concurrency: int, samples: int, server) -> dict:
    """The whole generator (checks, dedup, appends, progress) against the same server."""
    from megatron_kaja.synth import SeedFile, SynthConfig, run_synthesis

    with tempfile.TemporaryDirectory() as tmp:
        seeds = Path(tmp) / "seeds.jsonl"
        rows = [{"ID": str(i), "text": f"参考の質問その{i}です。"} for i in range(samples)]
        seeds.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        cfg = SynthConfig(
            seeds=[SeedFile(str(seeds), "safety")],
            out=str(Path(tmp) / "sft.jsonl"),
            model="bench-teacher",
            base_url=base_url,
            samples_per_seed=1,
            concurrency=concurrency,
            progress=False,
        )
        server0 = _cpu_seconds(server)
        cpu0 = time.process_time()
        summary = run_synthesis(cfg)
        cpu, server_cpu = time.process_time() - cpu0, _cpu_seconds(server) - server0
    run = summary["this_run"]
    return {
        "mode": "pipeline",
        "concurrency": concurrency,
        "samples": samples,
        "accepted": summary["accepted"],
        "requests": run["requests"],
        "seconds": run["seconds"],
        "requests_per_s": run["requests_per_s"],
        "client_cpu_ms_per_request": round(1000 * cpu / run["requests"], 3),
        "server_cpu_ms_per_request": round(1000 * server_cpu / run["requests"], 3),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }


def _cpu_seconds(process) -> float:
    times = process.cpu_times()
    return times.user + times.system


async def run_level(backend, concurrency: int, n: int, server) -> dict:
    """Send `n` requests with `concurrency` in flight; time wall clock, client and server CPU."""
    requests = [
        GenerationRequest(
            messages=[{"role": "user", "content": f"参考質問: 質問{i}"}],
            max_tokens=256,
            temperature=0.7,
        )
        for i in range(n)
    ]
    async with backend.session() as complete:
        # Warm up the connection pool outside the timing.
        await asyncio.gather(*(complete(r) for r in requests[:concurrency]))
        server0 = _cpu_seconds(server)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        results = await asyncio.gather(*(complete(r) for r in requests))
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        server_cpu = _cpu_seconds(server) - server0
    failed = sum(not r.ok for r in results)
    return {
        "mode": "client",
        "concurrency": concurrency,
        "requests": n,
        "failed": failed,
        "retries": sum(r.attempts - 1 for r in results),
        "seconds": round(wall, 3),
        "requests_per_s": round(n / wall, 1),
        "client_cpu_ms_per_request": round(1000 * cpu / n, 3),
        "server_cpu_ms_per_request": round(1000 * server_cpu / n, 3),
        # Other work on a shared machine takes CPU from both processes: keep it on record.
        "load_average_1min": round(os.getloadavg()[0], 2),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 256])
    p.add_argument("--delay-ms", type=float, default=50.0, help="server delay per request")
    p.add_argument(
        "--requests", type=int, help="requests per level (default: 20 x concurrency, >= 100)"
    )
    p.add_argument(
        "--pipeline-samples",
        type=int,
        default=0,
        help="also run the whole generator on this many samples at the highest concurrency",
    )
    p.add_argument("--out", help="append the results as JSON lines here")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        serve(args.delay_ms / 1000)
        return 0

    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", "--delay-ms", str(args.delay_ms)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        base_url = server.stdout.readline().strip()
        rows = []
        for c in args.concurrency:
            backend = build_backend(
                "openai", base_url=base_url, model="bench-teacher", max_concurrency=c
            )
            n = args.requests or max(100, 20 * c)
            row = asyncio.run(run_level(backend, c, n, psutil.Process(server.pid)))
            row["ideal_requests_per_s"] = round(c / (args.delay_ms / 1000), 1)
            row["delay_ms"] = args.delay_ms
            rows.append(row)
            print(
                f"concurrency {c:4d}: {row['requests_per_s']:8.1f} req/s "
                f"(ideal {row['ideal_requests_per_s']:.0f}), "
                f"CPU ms/request client {row['client_cpu_ms_per_request']:.3f} "
                f"server {row['server_cpu_ms_per_request']:.3f}, "
                f"failed {row['failed']}, retries {row['retries']}, "
                f"load average {row['load_average_1min']}",
                flush=True,
            )
        if args.pipeline_samples:
            c = max(args.concurrency)
            row = run_pipeline(base_url, c, args.pipeline_samples, psutil.Process(server.pid))
            rows.append(row)
            print(
                f"pipeline    {c:4d}: {row['requests_per_s']:8.1f} req/s, "
                f"CPU ms/request client {row['client_cpu_ms_per_request']:.3f} "
                f"server {row['server_cpu_ms_per_request']:.3f}, "
                f"{row['accepted']}/{row['samples']} accepted, "
                f"load average {row['load_average_1min']}",
                flush=True,
            )
    finally:
        server.stdin.close()
        server.wait(timeout=30)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
