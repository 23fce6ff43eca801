"""Where the gateway's extra latency at half load comes from (issue 10: +<= 0.5 ms P50 over direct), in one run.

Runs the bench stack (bench/overload.yaml) and measures, `work` at 5 ms, one class, open loop (as the suite's
overhead step):
1. timing: at RATES (a light load, and about half of direct's peak) per setup, alternating, ROUNDS rounds: client
   P50/P99, and per request the proxy's CPU, its kernel part, how long it waited for a core (runnable, both
   cores taken by the load generator and the shards) and how many times it was given one;
2. system calls: `strace -c` on the gateway and on nginx at the light load: calls per request by kind;
3. CPU profile: `perf record` on the gateway at half load: the share of its CPU by library, and the top symbols.

    .venv/bin/python bench/diagnose/half_load_profile.py [OUT_DIR]   # ~2 min; bench/results by default

Writes half-load-profile-<date>.{json,md}. Needs strace and perf (root, or perf_event_paranoid <= 1 for perf).
Every process is the stack's or a tracer of it and is stopped at the end.
"""

from __future__ import annotations

import datetime
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from controlplane.bench import procstat  # noqa: E402
from controlplane.bench.loadgen import Flow  # noqa: E402
from controlplane.bench.suite import API_KEY, Setups, machine, open_loop, work_body  # noqa: E402

RATES = (1000.0, 3500.0)  # req/s: light, and about half of direct's peak on the 5 ms model here
ROUNDS, WINDOW_S, TRACE_S = 3, 5.0, 4.0
SETUPS = ("direct", "nginx", "gateway")
FLOW = [Flow(name="standard", weight=1, api_key=API_KEY, deadline_ms=1000, send_deadline=False,
             body=work_body({"work_ms": 5}))]


def timing(setups: Setups) -> dict:
    runs: dict = {f"{setup} {rate:g}": [] for rate in RATES for setup in SETUPS}
    for _ in range(ROUNDS):
        for rate in RATES:
            for setup in SETUPS:
                pids = setups.proxy_pids(setup)
                cpu0, kernel0, (wait0, slices0) = (procstat.total_cpu_seconds(pids),
                                                   procstat.kernel_cpu_seconds(pids), procstat.run_queue(pids))
                got = open_loop(setups.urls[setup], rate, WINDOW_S, FLOW)["all"]
                n = max(got["sent"], 1)
                waited, slices = procstat.run_queue(pids)
                runs[f"{setup} {rate:g}"].append({
                    "p50_ms": got["ok_p50_ms"], "p99_ms": got["ok_p99_ms"],
                    "cpu_us": (procstat.total_cpu_seconds(pids) - cpu0) / n * 1e6,
                    "kernel_us": (procstat.kernel_cpu_seconds(pids) - kernel0) / n * 1e6,
                    "run_queue_us": (waited - wait0) / n * 1e6, "slices": (slices - slices0) / n})
    return {key: {k: round(statistics.median(w[k] for w in windows), 3) for k in windows[0]}
            for key, windows in runs.items()}


def syscalls(setups: Setups, workdir: Path) -> dict:
    out = {}
    for setup in ("gateway", "nginx"):
        report = workdir / f"strace-{setup}.txt"
        args = ["strace", "-c", "-f", "-o", str(report)]
        for pid in setups.proxy_pids(setup):
            args += ["-p", str(pid)]
        tracer = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(0.5)  # attached
            sent = open_loop(setups.urls[setup], RATES[0], TRACE_S, FLOW)["all"]["sent"]
        finally:
            tracer.send_signal(2)  # strace writes its table on SIGINT
            tracer.wait(timeout=30)
        calls = {}
        for line in report.read_text().splitlines():  # % time, seconds, usecs/call, calls, [errors,] syscall
            fields = line.split()
            if len(fields) >= 5 and fields[3].isdigit() and fields[-1] != "total":
                calls[fields[-1]] = round(int(fields[3]) / max(sent, 1), 2)
        out[setup] = {"requests": sent, "per_request": dict(sorted(calls.items(), key=lambda kv: -kv[1])),
                      "total_per_request": round(sum(calls.values()), 2)}
    return out


def cpu_profile(setups: Setups, workdir: Path) -> dict:
    data = workdir / "perf.data"
    pid = setups.gateway_pids()[0]
    recorder = subprocess.Popen(["perf", "record", "-F", "2999", "-p", str(pid), "-o", str(data), "--",
                                 "sleep", str(TRACE_S)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    open_loop(setups.urls["gateway"], RATES[1], TRACE_S + 0.5, FLOW)
    recorder.wait(timeout=60)

    def shares(sort: str, count: int) -> list[tuple[str, float]]:
        text = subprocess.run(["perf", "report", "-i", str(data), "--no-children", "--sort", sort, "--stdio"],
                              capture_output=True, text=True, timeout=120).stdout
        rows = re.findall(r"^\s+([\d.]+)%\s+(.+?)\s*$", text, re.M)
        return [(name, float(share)) for share, name in rows[:count]]

    return {"by_library": shares("dso", 8), "top_symbols": shares("sym", 15)}


def markdown(r: dict) -> str:
    lines = [f"# Half-load profile of the gateway, {r['date']}", "",
             f"Machine: {r['machine']}. `{r['command']}`. `work` at 5 ms, one class, open loop; medians over "
             f"{ROUNDS} rounds, setups alternating.", "", "## Timing", "",
             "| setup, req/s | P50 ms | P99 ms | P50 over direct | proxy CPU us/req | of which kernel | "
             "waited for a core us/req | given a core, times/req |", "|---|---|---|---|---|---|---|---|"]
    for key, t in r["timing"].items():
        direct = r["timing"][f"direct {key.split()[1]}"]
        lines.append(f"| {key} | {t['p50_ms']:.2f} | {t['p99_ms']:.2f} | {t['p50_ms'] - direct['p50_ms']:+.2f} | "
                     f"{t['cpu_us']:.1f} | {t['kernel_us']:.1f} | {t['run_queue_us']:.1f} | {t['slices']:.2f} |")
    lines += ["", f"## System calls per request at {RATES[0]:g} req/s (strace -c)", ""]
    for setup, s in r["syscalls"].items():
        calls = ", ".join(f"{name} {n}" for name, n in s["per_request"].items() if n >= 0.05)
        lines.append(f"- {setup}: {s['total_per_request']} in all ({calls}); {s['requests']} requests")
    profile = r["cpu_profile"]
    lines += ["", f"## Gateway CPU by library at {RATES[1]:g} req/s (perf)", "",
              ", ".join(f"{name} {share}%" for name, share in profile["by_library"]), "",
              "Top symbols: " + ", ".join(f"{name} {share}%" for name, share in profile["top_symbols"])]
    return "\n".join(lines) + "\n"


def main() -> None:
    out_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("bench/results")
    with tempfile.TemporaryDirectory(prefix="half-load-") as tmp:
        setups = Setups(Path(tmp))
        try:
            setups.wait_all_ready()
            for setup in SETUPS:  # warm-up
                open_loop(setups.urls[setup], RATES[0], 1.0, FLOW)
            result = {"date": datetime.date.today().isoformat(), "machine": machine(),
                      "command": "python bench/diagnose/half_load_profile.py " + " ".join(sys.argv[1:]),
                      "timing": timing(setups), "syscalls": syscalls(setups, Path(tmp)),
                      "cpu_profile": cpu_profile(setups, Path(tmp))}
        finally:
            setups.close()
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"half-load-profile-{result['date']}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
