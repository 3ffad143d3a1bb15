"""Runs every benchmark in bench/ and prints their figures as JSON (recorded in README.md)."""
import json

from bench import dataset_validation, gateway_overhead, graders, reconciler

if __name__ == "__main__":
    for module in (dataset_validation, graders, gateway_overhead, reconciler):
        print(json.dumps(module.run(), indent=2), flush=True)
