"""Issue #19's CPU measurement in one command, on whatever CPU this session has (the CPU differs
between machines: AVX-512 with VNNI one time, AVX2 only the next; docs/inference.md, "Per CPU
type"):

    .venv/bin/python tools/cpu_session.py      # ~15 min on 2 cores the first time (the peer's build)

1. names the CPU, its instruction sets, and the kernels it gets (`kernels/cpu.py`'s isa_name);
2. makes llama.cpp the peer: llama-cpp-python and gguf at the `peers` extra's pins (pyproject.toml),
   built once by pip into OUT/peers for this CPU, unless they import already (`--no-build`: none);
3. runs `benchmarks/decode.py --json` `--runs` times for each `--threads` (ours and llama.cpp side
   by side in each run), keeping every JSON in OUT;
4. prints the table docs/inference.md takes (each run's figure, comma-separated) and each of the
   issue's targets with the runs that meet it.

Timings never go into pass/fail tests; this prints what it measured. `make setup` first.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from glm130b.io import atomic_write_text  # noqa: E402
from glm130b.quant.kernels import cpu as kernel_build  # noqa: E402

# (our variant, llama.cpp's type): like for like (llama.cpp's Q8_0 file keeps its tied output in
# Q8_0, its Q4_0 file in Q6_K: the `_head8` rows match those)
PAIRS = [("fp32", "f32"), ("int8", "q8_0"), ("int8_head8", "q8_0"), ("int4", "q4_0"), ("int4_head8", "q4_0")]
FLAGS = ("avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16",
         "amx_bf16", "amx_int8", "asimd", "asimddp", "bf16", "i8mm", "sve")
BUILD_ARGS = ("-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF "
              "-DLLAMA_BUILD_SERVER=OFF -DGGML_NATIVE=ON")
# --emulate-avx2: an AVX2-only CPU on an AVX-512 one, as far as software goes (the memory system
# and clock stay this CPU's): our kernels, PyTorch's own code and llama.cpp all held to AVX2
AVX2_ENV = {"GLM130B_CPU_ISA": "avx2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
            "ONEDNN_MAX_CPU_ISA": "AVX2"}
AVX2_BUILD_ARGS = ("-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF "
                   "-DLLAMA_BUILD_SERVER=OFF -DGGML_NATIVE=OFF -DGGML_AVX512=OFF -DGGML_AVX512_VNNI=OFF "
                   "-DGGML_AVX512_VBMI=OFF -DGGML_AVX512_BF16=OFF -DGGML_AVX_VNNI=OFF -DGGML_AVX=ON "
                   "-DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON")


def cpu_report() -> dict:
    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    model = fields.get("model name") or fields.get("Hardware") or platform.processor()
    if "cpu family" in fields:  # (a model name can be as short as "AMD EPYC")
        model += f" (family {fields['cpu family']}, model {fields.get('model', '?')})"
    elif "CPU part" in fields:
        model += f" (CPU part {fields['CPU part']})"
    features = kernel_build.cpu_features()
    capability = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                                capture_output=True, text=True)  # (a fresh process: it reads ATEN_CPU_CAPABILITY)
    return {"cpu": model, "machine": platform.machine(), "cores": os.cpu_count(),
            "flags": [f for f in FLAGS if f in features], "kernel_isa": kernel_build.isa_name(),
            "torch_capability": capability.stdout.strip() or "?"}


def peer_pins() -> list[str]:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    return list(extras["peers"])


def peers_importable(env: dict) -> bool:
    probe = subprocess.run([sys.executable, "-c", "import llama_cpp, gguf"], env=env, capture_output=True)
    return probe.returncode == 0


def ensure_peers(out: Path, env: dict, build: bool, avx2: bool = False) -> dict:
    """The environment the benchmark runs in: PYTHONPATH with OUT/peers when the peer lives there
    (OUT/peers-avx2: llama.cpp built for AVX2 only)."""
    target = out / ("peers-avx2" if avx2 else "peers")
    env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), str(target),
                                                                env.get("PYTHONPATH")]))}
    if (peers_importable(env) and not avx2) or (avx2 and (target / "llama_cpp").is_dir()) or not build:
        return env
    print(f"building the peer into {target} ({', '.join(peer_pins())}; several minutes)", flush=True)
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
           *peer_pins(), "diskcache==5.6.3"]  # (llama_cpp imports diskcache; --no-deps keeps torch alone)
    done = subprocess.run(pip, env={**env, "CMAKE_ARGS": AVX2_BUILD_ARGS if avx2 else BUILD_ARGS})
    if done.returncode != 0 or not peers_importable(env):
        print("the peer could not be built: our figures only (benchmarks/decode.py skips it)", flush=True)
    return env


def run_benchmark(threads: int, run: int, out: Path, env: dict, variants: str, rounds: int) -> dict | None:
    path = out / f"decode-t{threads}-run{run}.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "decode.py"), "--json", "--threads", str(threads),
           "--rounds", str(rounds), "--variants", variants]
    print(f"[threads {threads}, run {run}] {' '.join(cmd[1:])}", flush=True)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stderr[-2000:], flush=True)
        return None
    result = json.loads(done.stdout[done.stdout.index("{"):])
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    return result


def _column(results: list[dict], *keys: str) -> list[float | None]:
    """results[i][keys[0]][keys[1]]... per run (None where a run lacks it)."""
    out = []
    for r in results:
        for k in keys:
            r = r.get(k) if isinstance(r, dict) else None
        out.append(r if isinstance(r, (int, float)) else None)
    return out


def _ratio(a: list[float | None], b: list[float | None]) -> list[float | None]:
    return [x / y if x and y else None for x, y in zip(a, b, strict=True)]


def _cells(values: list[float | None], fmt: str) -> str:
    return ", ".join("-" if v is None else fmt.format(v) for v in values)


def table(results: list[dict]) -> list[str]:
    """One line per (ours, llama.cpp) pair: MB per token, decode and prefill tokens/s, ratios."""
    lines = ["| weights / llama.cpp | MB/token ours / peer file | decode ours | decode peer | ours / peer "
             "| prefill ours | prefill peer | ours / peer |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for ours, q in PAIRS:
        if not any(ours in r["variants"] for r in results):
            continue
        mb = [None if b is None else b / 1e6 for b in _column(results[:1], "variants", ours, "weight_bytes_per_token")]
        peer_mb = _column(results[:1], "peers", "llama_cpp", q, "file_mb")
        dec, pdec = _column(results, "variants", ours, "tok_s"), _column(results, "peers", "llama_cpp", q, "tok_s")
        pre = _column(results, "variants", ours, "prefill_tok_s")
        ppre = _column(results, "peers", "llama_cpp", q, "prefill_tok_s")
        lines.append(f"| {ours} / {q.upper()} | {_cells(mb, '{:.1f}')} / {_cells(peer_mb, '{:.1f}')} "
                     f"| {_cells(dec, '{:.1f}')} | {_cells(pdec, '{:.1f}')} | {_cells(_ratio(dec, pdec), '{:.2f}')} "
                     f"| {_cells(pre, '{:.0f}')} | {_cells(ppre, '{:.0f}')} | {_cells(_ratio(pre, ppre), '{:.2f}')} |")
    return lines


def targets(results: list[dict]) -> list[str]:
    """The issue's targets, each with how many runs meet it."""
    checks = [(f"{ours} decode >= 1.0x llama.cpp {q.upper()}", f"{ours}_vs_llamacpp_{q}", 1.0) for ours, q in PAIRS]
    checks += [(f"{ours} prefill >= 1.0x llama.cpp {q.upper()}", f"{ours}_prefill_vs_llamacpp_{q}", 1.0)
               for ours, q in PAIRS]
    checks.append(("int4 decode >= 2.5x our fp32", "int4_vs_fp32", 2.5))
    lines = []
    for what, key, need in checks:
        got = [r.get(key) for r in results]
        if all(g is None for g in got):
            continue
        met = sum(1 for g in got if g is not None and g >= need)
        lines.append(f"- {what}: {_cells(got, '{:.2f}')} -> met in {met} of {len(got)} runs")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "runs" / "cpu-session"))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--rounds", type=int, default=3, help="benchmarks/decode.py --rounds (best of)")
    parser.add_argument("--variants", default="fp32,int8,int8_head8,int4,int4_head8")
    parser.add_argument("--no-build", action="store_true", help="do not build llama.cpp (our figures only)")
    parser.add_argument("--emulate-avx2", action="store_true",
                        help="hold our kernels, PyTorch and llama.cpp to AVX2 (on an AVX-512 CPU; not a real AVX2 CPU)")
    parser.add_argument("--from-json", nargs="*", help="only print the table of these benchmark JSON files")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.from_json:
        try:
            results = [json.loads(Path(f).read_text()) for f in args.from_json]
        except (OSError, ValueError) as e:
            parser.error(f"--from-json: not a benchmark JSON file: {e}")
        print("\n".join(table(results) + [""] + targets(results)))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    if args.emulate_avx2:
        os.environ.update(AVX2_ENV)  # (before anything reads them: the report's kernel ISA, torch's capability)
    report = cpu_report()
    report["emulated_avx2"] = args.emulate_avx2
    atomic_write_text(out / "cpu.json", json.dumps(report, indent=2) + "\n")
    print(f"{report['cpu']} ({report['machine']}, {report['cores']} cores): {' '.join(report['flags'])}; "
          f"our kernels: {report['kernel_isa']}; torch: {report['torch_capability']}", flush=True)
    env = ensure_peers(out, dict(os.environ), build=not args.no_build, avx2=args.emulate_avx2)
    for threads in (int(t) for t in args.threads.split(",")):
        results = [r for run in range(1, args.runs + 1)
                   if (r := run_benchmark(threads, run, out, env, args.variants, args.rounds)) is not None]
        if not results:
            print(f"threads {threads}: no run finished")
            continue
        bw = _cells([r.get("read_bw_gbs") for r in results], "{:.0f}")
        emulated = ", emulated AVX2-only (software held to AVX2)" if args.emulate_avx2 else ""
        print(f"\n**{report['cpu']}**{emulated}, {threads} thread(s), {len(results)} runs (read bandwidth {bw} GB/s), "
              f"`python benchmarks/decode.py --json --threads {threads} --rounds {args.rounds} "
              f"--variants {args.variants}`:\n")
        print("\n".join(table(results) + [""] + targets(results)), flush=True)
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
