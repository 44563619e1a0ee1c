"""Benchmark: raw llama-cpp-python vs the agent's LLM pipeline (in process and through MQTT).

Same model, threads, context and sampling (greedy) on every side; every round's prompt starts
with a different line so no side reuses the previous round's KV cache.

- **raw**: ``Llama.generate`` over the tokenized prompt, detokenizing every token (what any
  streaming consumer does); TTFT = call -> first token, decode tok/s = tokens after the first
  over the time from first to last token.
- **pipeline**: ``LlmPipeline.submit`` with an ``on_chunk`` callback (first token flushed at once);
  TTFT = submit -> first chunk callback; decode tok/s from the result's timing (same definition,
  measured inside the worker loop, so assembling, coalescing and publishing are inside it).
- **mqtt**: the whole agent (``Agent`` with the LLM pipeline and ``[reporting.mqtt]``) against a
  local mosquitto; a controller sends ``llm.generate``; TTFT = publish of the command -> first
  ``llm/{id}/stream`` message at the controller. MQTT round trip = mqtt TTFT - pipeline TTFT.
- **cancel latency**: ``pipeline.cancel`` during decode and during prompt evaluation -> the
  result is published; compared with one decode step (1 / decode tok/s).
- **prefix cache**: TTFT of a chat whose ~500-token system prompt is new (cold) vs one whose
  system prompt is in the prefix cache (an unrelated request runs in between, so the context
  itself no longer holds it).
- **RSS**: a fresh process loads the model (mmap, and without mmap): VmRSS / RssAnon / RssFile
  before and after load and after one generation, vs the file size.

Targets (issue #6): decode ratio >= 0.98, TTFT overhead <= 10 ms, cancel <= one decode step,
prefix-cache TTFT speed-up >= 5x. Every figure is reported, met or not; the machine's load
average is recorded at start and end (other work shares this machine).

    .venv/bin/python tools/bench_llm.py            # writes docs/benchmarks/llm.{json,png}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "mqtt"))
sys.path.insert(0, str(ROOT / "tests" / "llm"))

MODELS = {"gemma": "gemma-3-270m-q4_k_m", "smollm": "smollm2-135m-instruct-q4_1"}
BASE_PROMPT = (
    "The city council published its annual report on traffic. It describes the number of cars, "
    "buses and bicycles that crossed the main square every day, the hours with the most "
    "pedestrians, and the changes planned for next year. The report begins as follows:"
)
SYSTEM_LINE = (
    "You are the assistant of a traffic camera on a busy square. You answer briefly, only with "
    "facts from the counts you are given, and you never invent objects that were not seen. "
)


def _loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def _prompt(i: int) -> str:
    return f"Report number {1000 + i * 7919}.\n{BASE_PROMPT}"


# ------------------------------------------------------------------------------ raw


def bench_raw(path: Path, args: argparse.Namespace, threads: int) -> dict[str, Any]:
    import llama_cpp
    from llama_cpp import Llama

    llm = Llama(
        model_path=str(path),
        n_ctx=args.n_ctx,
        n_batch=args.n_batch,
        n_ubatch=args.n_batch,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    ttft, rate, tokens = [], [], []
    try:
        for i in range(args.warmup + args.rounds):
            prompt = llm.tokenize(_prompt(i).encode(), add_bos=True, special=True)
            t0 = time.perf_counter()
            first = last = 0.0
            n = 0
            for token in llm.generate(prompt, temp=0.0, top_k=40, top_p=0.95, min_p=0.05):
                now = time.perf_counter()
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    break
                llm.detokenize([token])
                if n == 0:
                    first = now
                last = now
                n += 1
                if n >= args.max_tokens:
                    break
            if i >= args.warmup:
                ttft.append((first - t0) * 1000)
                rate.append((n - 1) / (last - first))
                tokens.append(n)
    finally:
        llm.close()
    return {"ttft_ms": ttft, "decode_tok_s": rate, "tokens": tokens}


# ------------------------------------------------------------------------------ pipeline


def _pipeline(path_name: str, args: argparse.Namespace, sink: Any) -> Any:
    from llm_support import make_context, model_store

    from pipelines.config import LlmPipelineConfig
    from pipelines.llm.build import build_llm_pipeline

    config = LlmPipelineConfig.model_validate(
        {
            "type": "llm",
            "name": "bench",
            "model": path_name,
            "engine": {"n_ctx": args.n_ctx, "n_batch": args.n_batch},
            "defaults": {"temperature": 0.0, "max_tokens": args.max_tokens, "deadline_s": 600},
            "queue_size": 4,
        }
    )
    ctx, _ = make_context(model_store(), sink)
    pipeline = build_llm_pipeline(config, ctx)
    pipeline.start(threading.Event())
    return pipeline


class _NullSink:
    def publish(self, topic: str, message: Any) -> None:
        del topic, message

    def close(self) -> None:
        pass


def bench_pipeline(model: str, args: argparse.Namespace) -> dict[str, Any]:
    from pipelines.llm.requests import GenerateRequest

    pipeline = _pipeline(model, args, _NullSink())
    out: dict[str, Any] = {"ttft_ms": [], "decode_tok_s": [], "tokens": [], "inner_ttft_ms": []}
    try:
        for i in range(args.warmup + args.rounds):
            stamp: list[float] = []

            def on_chunk(_rid: str, _index: int, _text: str, got: list[float] = stamp) -> None:
                if not got:
                    got.append(time.perf_counter())

            t0 = time.perf_counter()
            handle = pipeline.submit(GenerateRequest(prompt=_prompt(i)), on_chunk=on_chunk)
            result = handle.wait(600)
            if result is None or result["status"] != "completed":
                raise RuntimeError(f"pipeline round failed: {result}")
            if i >= args.warmup:
                out["ttft_ms"].append((stamp[0] - t0) * 1000)
                out["inner_ttft_ms"].append(result["timing"]["ttft_ms"])
                out["decode_tok_s"].append(result["timing"]["decode_tokens_per_s"])
                out["tokens"].append(result["usage"]["completion_tokens"])
        out["cancel"] = _cancel_latency(pipeline, args)
        out["prefix"] = _prefix_cache(pipeline, args)
    finally:
        pipeline.stop(60)
    return out


def _cancel_latency(pipeline: Any, args: argparse.Namespace) -> dict[str, Any]:
    from pipelines.llm.requests import GenerateRequest

    decode_ms, prompt_ms, steps_ms = [], [], []
    for i in range(args.rounds):
        seen = threading.Event()
        count = [0]

        def on_chunk(
            _rid: str, _index: int, _text: str, c: list[int] = count, ev: threading.Event = seen
        ) -> None:
            c[0] += 1
            if c[0] >= 3:
                ev.set()

        handle = pipeline.submit(
            GenerateRequest(prompt=_prompt(100 + i), max_tokens=4000),
            on_chunk=on_chunk,
        )
        seen.wait(300)
        t0 = time.perf_counter()
        pipeline.cancel(handle.request_id, wait_s=60)
        decode_ms.append((time.perf_counter() - t0) * 1000)
        result = handle.wait(60) or {}
        rate = (result.get("timing") or {}).get("decode_tokens_per_s")
        if rate:
            steps_ms.append(1000.0 / rate)
        # during prompt evaluation: a long prompt, cancelled once evaluation is under way
        long_prompt = _prompt(200 + i) + " " + BASE_PROMPT * 8
        handle = pipeline.submit(GenerateRequest(prompt=long_prompt, max_tokens=4))
        while True:
            running = pipeline.status()["running"]
            if (
                running
                and running["request_id"] == handle.request_id
                and running["prompt_tokens_evaluated"] > 0
            ):
                break
            time.sleep(0.001)
        t0 = time.perf_counter()
        pipeline.cancel(handle.request_id, wait_s=60)
        prompt_ms.append((time.perf_counter() - t0) * 1000)
    return {
        "decode_cancel_ms": decode_ms,
        "prompt_cancel_ms": prompt_ms,
        "decode_step_ms": steps_ms,
    }


def _prefix_cache(pipeline: Any, args: argparse.Namespace) -> dict[str, Any]:
    from pipelines.llm.requests import ChatMessage, GenerateRequest

    engine = pipeline.engine
    if not engine.has_chat_template:
        return {"skipped": "model has no chat template"}
    cold, warm, prefix_tokens = [], [], []

    def ask(system: str, question: str) -> dict[str, Any]:
        request = GenerateRequest(
            messages=[
                ChatMessage(role="system", content=system),
                ChatMessage(role="user", content=question),
            ],
            max_tokens=4,
        )
        t0 = time.perf_counter()
        stamp: list[float] = []
        handle = pipeline.submit(
            request, on_chunk=lambda *_: stamp.append(time.perf_counter()) if not stamp else None
        )
        result = handle.wait(600) or {}
        result["client_ttft_ms"] = (stamp[0] - t0) * 1000 if stamp else float("nan")
        return result

    for i in range(args.rounds):
        system = f"Camera {i * 31}. " + SYSTEM_LINE * 12  # ~500 tokens
        first = ask(system, "How many buses passed?")  # cold: evaluates the whole prompt
        pipeline.generate(GenerateRequest(prompt=_prompt(300 + i), max_tokens=2), timeout=600)
        second = ask(system, "Were there bicycles?")  # the system part comes from the cache
        if second["cache"]["source"] != "prefix":
            raise RuntimeError(f"prefix cache not used: {second['cache']}")
        cold.append(first["client_ttft_ms"])
        warm.append(second["client_ttft_ms"])
        prefix_tokens.append(second["usage"]["prompt_tokens_cached"])
    return {"cold_ttft_ms": cold, "cached_ttft_ms": warm, "prefix_tokens": prefix_tokens}


# ------------------------------------------------------------------------------ mqtt


def bench_mqtt(model: str, args: argparse.Namespace) -> dict[str, Any]:
    from broker_support import PASSWORD, close_monitor, open_monitor, running_broker
    from commands_support import envelope
    from llm_support import model_store

    from agent.config import AgentConfig
    from agent.process import Agent

    device = "dev001"
    store = model_store()
    out: dict[str, Any] = {"ttft_ms": [], "decode_tok_s": [], "tokens": []}
    with running_broker() as broker, tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "pw").write_text(PASSWORD + "\n")
        config = AgentConfig.model_validate(
            {
                "device_id": device,
                "state_dir": str(Path(tmp) / "state"),
                "models": {
                    "store_dir": str(store.store_dir),
                    "wheel_cache_dir": str(store.wheel_cache_dir),
                },
                "reporting": {
                    "jsonl": {"enabled": False},
                    "mqtt": {
                        "port": broker.port,
                        "username": device,
                        "password_file": str(Path(tmp) / "pw"),
                        "commands": {
                            "trusted_keys_dir": str(Path(tmp) / "keys"),
                            "rate_limits": {"control": {"rate_per_s": 100, "burst": 100}},
                        },
                    },
                },
                "pipelines": [
                    {
                        "type": "llm",
                        "name": "bench",
                        "model": model,
                        "engine": {"n_ctx": args.n_ctx, "n_batch": args.n_batch},
                        "defaults": {
                            "temperature": 0.0,
                            "max_tokens": args.max_tokens,
                            "deadline_s": 600,
                        },
                    }
                ],
            }
        )
        mon = open_monitor(broker, f"edge/{device}/llm/#")
        agent = Agent(config, environ={})
        try:
            agent.start()
            if agent.mqtt is None or not agent.mqtt.reporter.wait_connected(30):
                raise RuntimeError("agent did not connect to the broker")
            for i in range(args.warmup + args.rounds):
                rid = f"bench-{i}-{os.getpid()}"
                env = envelope(args={"prompt": _prompt(i), "request_id": rid})
                t0 = time.perf_counter()
                mon.send(f"edge/{device}/cmd/llm.generate", json.dumps(env))
                first = mon.wait_for(lambda m, r=rid: m.topic.endswith(f"/{r}/stream"), 600)
                t_first = time.perf_counter()
                done = mon.wait_for(lambda m, r=rid: m.topic.endswith(f"/{r}/result"), 600)
                if not first or not done:
                    raise RuntimeError("no stream/result over MQTT")
                result = json.loads(done[0].payload)
                if i >= args.warmup:
                    out["ttft_ms"].append((t_first - t0) * 1000)
                    out["decode_tok_s"].append(result["timing"]["decode_tokens_per_s"])
                    out["tokens"].append(result["usage"]["completion_tokens"])
        finally:
            agent.stop()
            close_monitor(mon)
    return out


# ------------------------------------------------------------------------------ rss


_RSS_CHILD = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
from engines.llama import Sampling, open_llama
from engines.llama_config import LlamaCppConfig

def rss():
    out = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out

path, mmap = sys.argv[2], sys.argv[3] == "1"
before = rss()
engine = open_llama(LlamaCppConfig(n_ctx=512, use_mmap=mmap), path,
                    cpus=frozenset(os.sched_getaffinity(0)))
loaded = rss()
engine.evaluate(engine.tokenize("The report begins as follows:", add_bos=True))
for n, token in enumerate(engine.generate(Sampling(temperature=0.0))):
    if n >= 16:
        break
generated = rss()
engine.close()
print(json.dumps({"before": before, "loaded": loaded, "generated": generated}))
"""


def bench_rss(path: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"model_bytes": path.stat().st_size}
    for mmap in (True, False):
        proc = subprocess.run(
            [sys.executable, "-c", _RSS_CHILD, str(ROOT), str(path), "1" if mmap else "0"],
            capture_output=True,
            text=True,
            check=True,
        )
        out["mmap" if mmap else "no_mmap"] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


# ------------------------------------------------------------------------------ main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="gemma")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--n-ctx", type=int, default=2048)
    parser.add_argument("--n-batch", type=int, default=128)
    parser.add_argument("--skip-mqtt", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "llm.json")
    args = parser.parse_args()

    from llm_support import model_store

    name = MODELS[args.model]
    path = model_store().resolve(name)
    threads = len(os.sched_getaffinity(0))
    load_start = _loadavg()
    started = time.time()
    raw = bench_raw(path, args, threads)
    pipe = bench_pipeline(name, args)
    chat = None
    if args.model != "smollm":  # gemma has no chat template: prefix cache on SmolLM2
        chat = bench_pipeline_chat(args)
    mqtt = None if args.skip_mqtt else bench_mqtt(name, args)
    rss = bench_rss(path)
    load_end = _loadavg()

    raw_rate, pipe_rate = _median(raw["decode_tok_s"]), _median(pipe["decode_tok_s"])
    prefix = chat if chat is not None else pipe["prefix"]
    cancel = pipe["cancel"]
    step_ms = _median(cancel["decode_step_ms"])
    result: dict[str, Any] = {
        "model": name,
        "model_file": path.name,
        "threads": threads,
        "n_ctx": args.n_ctx,
        "n_batch": args.n_batch,
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
        "sampling": "greedy (temperature 0), top_k 40, top_p 0.95, min_p 0.05",
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "loadavg_start": load_start,
            "loadavg_end": load_end,
        },
        "seconds": round(time.time() - started, 1),
        "raw": raw,
        "pipeline": {k: v for k, v in pipe.items() if k not in ("cancel", "prefix")},
        "mqtt": mqtt,
        "cancel": cancel,
        "prefix_cache": {"model": MODELS["smollm"] if chat else name, **prefix},
        "rss": rss,
        "summary": {
            "raw_decode_tok_s": round(raw_rate, 2),
            "pipeline_decode_tok_s": round(pipe_rate, 2),
            "decode_ratio_pipeline_to_raw": round(pipe_rate / raw_rate, 4),
            "mqtt_decode_tok_s": round(_median(mqtt["decode_tok_s"]), 2) if mqtt else None,
            "decode_ratio_mqtt_to_raw": (
                round(_median(mqtt["decode_tok_s"]) / raw_rate, 4) if mqtt else None
            ),
            "raw_ttft_ms": round(_median(raw["ttft_ms"]), 2),
            "pipeline_ttft_ms": round(_median(pipe["ttft_ms"]), 2),
            "ttft_overhead_ms": round(_median(pipe["ttft_ms"]) - _median(raw["ttft_ms"]), 2),
            "mqtt_ttft_ms": round(_median(mqtt["ttft_ms"]), 2) if mqtt else None,
            "mqtt_round_trip_ms": (
                round(_median(mqtt["ttft_ms"]) - _median(pipe["ttft_ms"]), 2) if mqtt else None
            ),
            "decode_step_ms": round(step_ms, 2),
            "cancel_decode_ms": round(_median(cancel["decode_cancel_ms"]), 2),
            "cancel_decode_in_steps": round(_median(cancel["decode_cancel_ms"]) / step_ms, 3),
            "cancel_prompt_eval_ms": round(_median(cancel["prompt_cancel_ms"]), 2),
            "prefix_cold_ttft_ms": round(_median(prefix["cold_ttft_ms"]), 2),
            "prefix_cached_ttft_ms": round(_median(prefix["cached_ttft_ms"]), 2),
            "prefix_speedup": round(
                _median(prefix["cold_ttft_ms"]) / _median(prefix["cached_ttft_ms"]), 2
            ),
            "prefix_tokens": int(_median(prefix["prefix_tokens"])),
            "rss_loaded_mmap_mb": round(rss["mmap"]["loaded"]["VmRSS"] / 1e6, 1),
            "rss_generated_mmap_mb": round(rss["mmap"]["generated"]["VmRSS"] / 1e6, 1),
            "rss_loaded_no_mmap_mb": round(rss["no_mmap"]["loaded"]["VmRSS"] / 1e6, 1),
            "model_mb": round(rss["model_bytes"] / 1e6, 1),
        },
    }
    summary = result["summary"]
    summary["targets"] = {
        "decode_ratio>=0.98": summary["decode_ratio_pipeline_to_raw"] >= 0.98,
        "ttft_overhead<=10ms": summary["ttft_overhead_ms"] <= 10.0,
        "cancel<=1_decode_step": summary["cancel_decode_in_steps"] <= 1.0,
        "prefix_speedup>=5x": summary["prefix_speedup"] >= 5.0,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    _plot(result, args.out.with_suffix(".png"))
    print(json.dumps(summary, indent=2))
    return 0


def bench_pipeline_chat(args: argparse.Namespace) -> dict[str, Any]:
    """The prefix-cache figures need a chat template: measured on SmolLM2."""
    pipeline = _pipeline(MODELS["smollm"], args, _NullSink())
    try:
        return _prefix_cache(pipeline, args)
    finally:
        pipeline.stop(60)


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["summary"]
    fig, axes = plt.subplots(1, 4, figsize=(15, 4))
    ax = axes[0]
    labels = ["raw", "pipeline"] + (["mqtt"] if s["mqtt_decode_tok_s"] else [])
    values = [s["raw_decode_tok_s"], s["pipeline_decode_tok_s"]] + (
        [s["mqtt_decode_tok_s"]] if s["mqtt_decode_tok_s"] else []
    )
    ax.bar(labels, values, color=["#888888", "#3070b0", "#70a0d0"][: len(labels)])
    ax.set_title(f"decode tok/s (ratio {s['decode_ratio_pipeline_to_raw']:.3f}, >= 0.98)")
    ax = axes[1]
    labels = ["raw", "pipeline"] + (["mqtt"] if s["mqtt_ttft_ms"] else [])
    values = [s["raw_ttft_ms"], s["pipeline_ttft_ms"]] + (
        [s["mqtt_ttft_ms"]] if s["mqtt_ttft_ms"] else []
    )
    ax.bar(labels, values, color=["#888888", "#3070b0", "#70a0d0"][: len(labels)])
    ax.set_title(f"TTFT ms (overhead {s['ttft_overhead_ms']:.1f} ms, <= 10)")
    ax = axes[2]
    ax.bar(
        ["decode step", "cancel (decode)", "cancel (prompt)"],
        [s["decode_step_ms"], s["cancel_decode_ms"], s["cancel_prompt_eval_ms"]],
        color=["#888888", "#b05030", "#d08060"],
    )
    ax.set_title(f"cancel latency ms ({s['cancel_decode_in_steps']:.2f} steps, <= 1)")
    ax = axes[3]
    ax.bar(
        ["cold", "cached prefix"],
        [s["prefix_cold_ttft_ms"], s["prefix_cached_ttft_ms"]],
        color=["#888888", "#30a050"],
    )
    ax.set_title(
        f"TTFT, {s['prefix_tokens']}-token system prompt ({s['prefix_speedup']:.1f}x, >= 5x)"
    )
    load = result["machine"]
    fig.suptitle(
        f"{result['model']} on {result['threads']} threads; RSS after load (mmap) "
        f"{s['rss_loaded_mmap_mb']} MB vs file {s['model_mb']} MB; loadavg "
        f"{load['loadavg_start'][0]} -> {load['loadavg_end'][0]}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
