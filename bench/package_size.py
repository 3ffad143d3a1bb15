"""Deployment package size: the zip all six Lambda functions share, zipped and unzipped.

Builds it as `make package STAGE=dev` does (deploy.template, `chalice package`, then
deploy.template's slimming), into a temporary directory. The baseline, in the same run, is the
zip exactly as `chalice package` writes it; the target is at most 20 MB zipped (issue #12).
Also lists the largest top-level entries of the final zip.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import zipfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

STAGE = "dev"


def measure(path: Path) -> dict:
    with zipfile.ZipFile(path) as z:
        infos = z.infolist()
    return {"zipped_mb": round(path.stat().st_size / 1e6, 2),
            "unzipped_mb": round(sum(i.file_size for i in infos) / 1e6, 2), "files": len(infos)}


def largest(path: Path, limit: int = 10) -> list[dict]:
    zipped, unzipped = Counter(), Counter()
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            top = info.filename.split("/")[0]
            zipped[top] += info.compress_size
            unzipped[top] += info.file_size
    return [{"entry": name, "zipped_mb": round(size / 1e6, 2), "unzipped_mb": round(unzipped[name] / 1e6, 2)}
            for name, size in zipped.most_common(limit)]


def run() -> dict:
    from deploy.template import MAX_PACKAGE_BYTES, slim_package

    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_ENDPOINT_URL", "RFT_"))}
    env.update({"RFT_STAGE": STAGE, "RFT_TABLE_PREFIX": f"rfthub-{STAGE}-",
                "AWS_DEFAULT_REGION": env.get("AWS_DEFAULT_REGION", "us-west-2")})
    bin_dir = Path(sys.executable).parent
    subprocess.run([sys.executable, "-m", "deploy.template", STAGE], cwd=ROOT, env=env, check=True,
                   capture_output=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([str(bin_dir / "chalice"), "package", "--stage", STAGE, "--merge-template",
                        str(ROOT / "build" / f"resources-{STAGE}.json"), tmp], cwd=ROOT, env=env, check=True,
                       capture_output=True)
        package = Path(tmp) / "deployment.zip"
        baseline = measure(package)
        slim_package(package)
        final = measure(package)
        top = largest(package)
    result = {"benchmark": "package_size", "stage": STAGE, "chalice_package_as_written": baseline,
              "deployment_package": final, "target_zipped_mb": round(MAX_PACKAGE_BYTES / 1e6, 2),
              "within_target": final["zipped_mb"] * 1e6 <= MAX_PACKAGE_BYTES, "largest_entries": top}
    print(f"deployment package: {final['zipped_mb']} MB zipped, {final['unzipped_mb']} MB unzipped "
          f"({baseline['zipped_mb']} / {baseline['unzipped_mb']} MB as chalice package writes it); "
          f"target <= {result['target_zipped_mb']} MB zipped", file=sys.stderr)
    return result


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
