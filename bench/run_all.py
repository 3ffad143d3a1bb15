"""Runs every benchmark in bench/ and prints their figures as JSON (recorded in docs/benchmarks.md).

Each runs in its own process: the ones that start a local stack bind clients to its ports."""
import subprocess
import sys

MODULES = ("bench.dataset_validation", "bench.graders", "bench.gateway_overhead", "bench.reconciler",
           "bench.money", "bench.streaming", "bench.dataplane_breakdown", "bench.reward_wrap", "bench.cold_import",
           "bench.package_size", "bench.watch_sim", "bench.metrics_overhead")

if __name__ == "__main__":
    failed = 0
    for module in MODULES:
        result = subprocess.run([sys.executable, "-m", module], capture_output=True, text=True)
        print(result.stdout, flush=True)
        if result.returncode:
            failed += 1
            print(result.stderr[-2000:], file=sys.stderr)
    sys.exit(1 if failed else 0)
