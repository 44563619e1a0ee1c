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


def _engine(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "n_ctx": args.n_ctx,
        "n_batch": args.n_batch,
        "threads": args.threads,
        "batch_threads": args.threads,
    }


def _prompt(i: int) -> str:
    return f"Report number {1000 + i * 7919}.\n{BASE_PROMPT}"


# ------------------------------------------------------------------------------ sides


class RawSide:
    """Plain llama-cpp-python: ``Llama.generate`` + ``detokenize`` per token."""

    name = "raw"

    def __init__(self, path: Path, args: argparse.Namespace, threads: int) -> None:
        import llama_cpp
        from llama_cpp import Llama

        self._rt = llama_cpp
        self.llm = Llama(
            model_path=str(path),
            n_ctx=args.n_ctx,
            n_batch=args.n_batch,
            n_ubatch=args.n_batch,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )
        self._vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self._max = args.max_tokens

    def run(self, prompt: str) -> tuple[float, float, int]:
        """(TTFT ms, decode tok/s, tokens)."""
        llm = self.llm
        t0 = time.perf_counter()
        tokens = llm.tokenize(prompt.encode(), add_bos=True, special=True)
        first = last = 0.0
        n = 0
        for token in llm.generate(tokens, temp=0.0, top_k=40, top_p=0.95, min_p=0.05):
            now = time.perf_counter()
            if self._rt.llama_vocab_is_eog(self._vocab, token):
                break
            llm.detokenize([token])
            if n == 0:
                first = now
            last = now
            n += 1
            if n >= self._max:
                break
        return (first - t0) * 1000, (n - 1) / (last - first), n

    def close(self) -> None:
        self.llm.close()


def _pipeline(model: str, args: argparse.Namespace, sink: Any) -> Any:
    from llm_support import make_context, model_store

    from pipelines.config import LlmPipelineConfig
    from pipelines.llm.build import build_llm_pipeline

    config = LlmPipelineConfig.model_validate(
        {
            "type": "llm",
            "name": "bench",
            "model": model,
            "engine": _engine(args),
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


class PipelineSide:
    """``LlmPipeline.submit`` in this process; TTFT at the first ``on_chunk``."""

    name = "pipeline"

    def __init__(self, model: str, args: argparse.Namespace) -> None:
        self.pipeline = _pipeline(model, args, _NullSink())

    def run(self, prompt: str) -> tuple[float, float, int]:
        from pipelines.llm.requests import GenerateRequest

        stamp: list[float] = []

        def on_chunk(_rid: str, _index: int, _text: str) -> None:
            if not stamp:
                stamp.append(time.perf_counter())

        t0 = time.perf_counter()
        handle = self.pipeline.submit(GenerateRequest(prompt=prompt), on_chunk=on_chunk)
        result = handle.wait(600)
        if result is None or result["status"] != "completed":
            raise RuntimeError(f"pipeline round failed: {result}")
        timing = result["timing"]
        return (
            (stamp[0] - t0) * 1000,
            timing["decode_tokens_per_s"],
            result["usage"]["completion_tokens"],
        )

    def close(self) -> None:
        self.pipeline.stop(60)


class MqttSide:
    """The whole agent (LLM pipeline + MQTT reporting and commands) against a local
    mosquitto; a controller sends ``llm.generate``, TTFT at the first stream message."""

    name = "mqtt"

    def __init__(self, model: str, args: argparse.Namespace) -> None:
        from broker_support import PASSWORD, open_monitor, running_broker
        from llm_support import model_store

        from agent.config import AgentConfig
        from agent.process import Agent

        self.device = "dev001"
        store = model_store()
        self._broker_cm = running_broker()
        broker = self._broker_cm.__enter__()
        self._tmp = tempfile.TemporaryDirectory()
        tmp = Path(self._tmp.name)
        (tmp / "pw").write_text(PASSWORD + "\n")
        config = AgentConfig.model_validate(
            {
                "device_id": self.device,
                "state_dir": str(tmp / "state"),
                "models": {
                    "store_dir": str(store.store_dir),
                    "wheel_cache_dir": str(store.wheel_cache_dir),
                },
                "reporting": {
                    "jsonl": {"enabled": False},
                    "mqtt": {
                        "port": broker.port,
                        "username": self.device,
                        "password_file": str(tmp / "pw"),
                        "commands": {
                            "trusted_keys_dir": str(tmp / "keys"),
                            "rate_limits": {"control": {"rate_per_s": 100, "burst": 100}},
                        },
                    },
                },
                "pipelines": [
                    {
                        "type": "llm",
                        "name": "bench",
                        "model": model,
                        "engine": _engine(args),
                        "defaults": {
                            "temperature": 0.0,
                            "max_tokens": args.max_tokens,
                            "deadline_s": 600,
                        },
                    }
                ],
            }
        )
        self.mon = open_monitor(broker, f"edge/{self.device}/llm/#")
        self.agent = Agent(config, environ={})
        self.agent.start()
        if self.agent.mqtt is None or not self.agent.mqtt.reporter.wait_connected(30):
            raise RuntimeError("agent did not connect to the broker")
        self._n = 0

    def run(self, prompt: str) -> tuple[float, float, int]:
        from commands_support import envelope

        self._n += 1
        rid = f"bench-{self._n}-{os.getpid()}"
        env = envelope(args={"prompt": prompt, "request_id": rid})
        t0 = time.perf_counter()
        self.mon.send(f"edge/{self.device}/cmd/llm.generate", json.dumps(env))
        first = self.mon.wait_for(lambda m: m.topic.endswith(f"/{rid}/stream"), 600)
        t_first = time.perf_counter()
        done = self.mon.wait_for(lambda m: m.topic.endswith(f"/{rid}/result"), 600)
        if not first or not done:
            raise RuntimeError("no stream/result over MQTT")
        result = json.loads(done[0].payload)
        return (
            (t_first - t0) * 1000,
            result["timing"]["decode_tokens_per_s"],
            result["usage"]["completion_tokens"],
        )

    def close(self) -> None:
        from broker_support import close_monitor

        try:
            self.agent.stop()
            close_monitor(self.mon)
        finally:
            self._broker_cm.__exit__(None, None, None)
            self._tmp.cleanup()


def interleaved(sides: list[Any], args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    """Every round runs each side once (order rotated per round) on that round's prompt."""
    out: dict[str, dict[str, list[float]]] = {
        side.name: {"ttft_ms": [], "decode_tok_s": [], "tokens": []} for side in sides
    }
    for i in range(args.warmup + args.rounds):
        order = sides[i % len(sides) :] + sides[: i % len(sides)]
        for side in order:
            ttft, rate, n = side.run(_prompt(i))
            if i >= args.warmup:
                out[side.name]["ttft_ms"].append(ttft)
                out[side.name]["decode_tok_s"].append(rate)
                out[side.name]["tokens"].append(n)
        print(f"round {i + 1}/{args.warmup + args.rounds} done", file=sys.stderr)
    return out


def _cancel_latency(pipeline: Any, args: argparse.Namespace) -> dict[str, Any]:
    from pipelines.llm.requests import GenerateRequest

    decode_ms, prompt_ms = [], []
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
        outcome = pipeline.cancel(handle.request_id, wait_s=60)
        decode_ms.append((time.perf_counter() - t0) * 1000)
        if outcome is None or (outcome["stage"], outcome["status"]) != ("decode", "cancelled"):
            raise RuntimeError(f"decode cancel did not land in decode: {outcome}")
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
        outcome = pipeline.cancel(handle.request_id, wait_s=60)
        prompt_ms.append((time.perf_counter() - t0) * 1000)
        if outcome is None or outcome["stage"] != "prompt_eval":
            raise RuntimeError(f"prompt cancel did not land in prompt evaluation: {outcome}")
    return {"decode_cancel_ms": decode_ms, "prompt_cancel_ms": prompt_ms}


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
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="llama.cpp threads on every side (default 1: on a machine shared with other work, "
        "2 threads waiting for each other at llama.cpp's spinning barriers make every figure "
        "noise)",
    )
    parser.add_argument("--skip-mqtt", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "llm.json")
    args = parser.parse_args()

    from llm_support import model_store

    name = MODELS[args.model]
    path = model_store().resolve(name)
    threads = args.threads
    load_start = _loadavg()
    started = time.time()
    sides: list[Any] = [RawSide(path, args, threads), PipelineSide(name, args)]
    try:
        if not args.skip_mqtt:
            sides.append(MqttSide(name, args))
        runs = interleaved(sides, args)
        cancel = _cancel_latency(sides[1].pipeline, args)
        prefix = None if args.model == "smollm" else bench_pipeline_chat(args)
        if prefix is None:
            prefix = _prefix_cache(sides[1].pipeline, args)
    finally:
        for side in sides:
            side.close()
    rss = bench_rss(path)
    load_end = _loadavg()

    raw, pipe, mqtt = runs["raw"], runs["pipeline"], runs.get("mqtt")
    raw_rate, pipe_rate = _median(raw["decode_tok_s"]), _median(pipe["decode_tok_s"])
    step_ms = 1000.0 / pipe_rate
    ratios = [p / r for p, r in zip(pipe["decode_tok_s"], raw["decode_tok_s"], strict=True)]
    result: dict[str, Any] = {
        "model": name,
        "model_file": path.name,
        "threads": threads,
        "n_ctx": args.n_ctx,
        "n_batch": args.n_batch,
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
        "warmup_rounds": args.warmup,
        "sampling": "greedy (temperature 0), top_k 40, top_p 0.95, min_p 0.05",
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "loadavg_start": load_start,
            "loadavg_end": load_end,
        },
        "seconds": round(time.time() - started, 1),
        "runs": runs,
        "per_round_decode_ratio_pipeline_to_raw": [round(x, 4) for x in ratios],
        "cancel": cancel,
        "prefix_cache": {"model": MODELS["smollm"] if args.model != "smollm" else name, **prefix},
        "rss": rss,
    }
    mqtt_ttft = _median(mqtt["ttft_ms"]) if mqtt else None
    mqtt_rate = _median(mqtt["decode_tok_s"]) if mqtt else None
    summary: dict[str, Any] = {
        "raw_decode_tok_s": round(raw_rate, 2),
        "pipeline_decode_tok_s": round(pipe_rate, 2),
        "decode_ratio_pipeline_to_raw": round(pipe_rate / raw_rate, 4),
        "mqtt_decode_tok_s": round(mqtt_rate, 2) if mqtt_rate else None,
        "decode_ratio_mqtt_to_raw": round(mqtt_rate / raw_rate, 4) if mqtt_rate else None,
        "raw_ttft_ms": round(_median(raw["ttft_ms"]), 2),
        "pipeline_ttft_ms": round(_median(pipe["ttft_ms"]), 2),
        "ttft_overhead_ms": round(_median(pipe["ttft_ms"]) - _median(raw["ttft_ms"]), 2),
        "mqtt_ttft_ms": round(mqtt_ttft, 2) if mqtt_ttft else None,
        "mqtt_round_trip_ms": (
            round(mqtt_ttft - _median(pipe["ttft_ms"]), 2) if mqtt_ttft else None
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
        "model_mb": round(rss["model_bytes"] / 1e6, 1),
        "rss_loaded_mmap_mb": round(rss["mmap"]["loaded"]["VmRSS"] / 1e6, 1),
        "rss_loaded_mmap_anon_mb": round(rss["mmap"]["loaded"]["RssAnon"] / 1e6, 1),
        "rss_loaded_mmap_file_mb": round(rss["mmap"]["loaded"]["RssFile"] / 1e6, 1),
        "rss_loaded_no_mmap_mb": round(rss["no_mmap"]["loaded"]["VmRSS"] / 1e6, 1),
        "rss_loaded_no_mmap_anon_mb": round(rss["no_mmap"]["loaded"]["RssAnon"] / 1e6, 1),
    }
    summary["targets"] = {
        "decode_ratio>=0.98": summary["decode_ratio_pipeline_to_raw"] >= 0.98,
        "ttft_overhead<=10ms": summary["ttft_overhead_ms"] <= 10.0,
        "cancel<=1_decode_step": summary["cancel_decode_in_steps"] <= 1.0,
        "prefix_speedup>=5x": summary["prefix_speedup"] >= 5.0,
    }
    result["summary"] = summary
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

    s, runs = result["summary"], result["runs"]
    names = [n for n in ("raw", "pipeline", "mqtt") if n in runs]
    colors = {"raw": "#888888", "pipeline": "#3070b0", "mqtt": "#70a0d0"}
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, key, title in (
        (
            axes[0][0],
            "decode_tok_s",
            f"decode tok/s: pipeline/raw {s['decode_ratio_pipeline_to_raw']:.3f} (>= 0.98)",
        ),
        (axes[0][1], "ttft_ms", f"TTFT ms: overhead {s['ttft_overhead_ms']:+.1f} ms (<= 10)"),
    ):
        medians = [_median(runs[n][key]) for n in names]
        ax.bar(names, medians, color=[colors[n] for n in names])
        for i, n in enumerate(names):
            ax.scatter([i] * len(runs[n][key]), runs[n][key], color="black", s=12, zorder=3)
        ax.set_title(title, fontsize=10)
    ax = axes[1][0]
    ax.bar(
        ["decode step", "cancel\n(decoding)", "cancel\n(prompt eval)"],
        [s["decode_step_ms"], s["cancel_decode_ms"], s["cancel_prompt_eval_ms"]],
        color=["#888888", "#b05030", "#d08060"],
    )
    ax.set_ylabel("ms")
    ax.set_title(
        f"cancel -> request ended: {s['cancel_decode_in_steps']:.2f} decode steps (<= 1)",
        fontsize=10,
    )
    ax = axes[1][1]
    ax.bar(
        ["cold", "cached prefix"],
        [s["prefix_cold_ttft_ms"], s["prefix_cached_ttft_ms"]],
        color=["#888888", "#30a050"],
    )
    ax.set_ylabel("ms")
    ax.set_title(
        f"TTFT with a {s['prefix_tokens']}-token system prompt: {s['prefix_speedup']:.1f}x (>= 5x)",
        fontsize=10,
    )
    load = result["machine"]
    fig.suptitle(
        f"{result['model']}, llama.cpp threads: {result['threads']}, "
        f"{result['rounds']} rounds (medians); "
        f"RSS after load {s['rss_loaded_mmap_mb']} MB (mmap; {s['rss_loaded_mmap_anon_mb']} MB "
        f"anonymous) vs file {s['model_mb']} MB\nloadavg {load['loadavg_start'][0]} -> "
        f"{load['loadavg_end'][0]} (shared machine)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
