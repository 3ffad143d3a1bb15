"""Tests that read OpenAI's document (../shared) on a clone without it: skipped with one line naming
the file, unless CI=true, where its absence fails (tests/openai_spec.require_spec)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]     # tests/, where openai_spec.py lives

# Two tests reading the document through different entry points (validate and validate_component).
PROBE = """
import openai_spec as spec

def test_reads_an_operation():
    spec.validate("get", "/v1/files/file-1", 200, {})

def test_reads_a_component():
    spec.validate_component("OpenAIFile", {})
"""


def _run(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess:
    (tmp_path / "test_probe.py").write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
    env.update(RFT_SHARED_DIR=str(tmp_path / "no-shared"), PYTHONPATH=str(TESTS))
    if ci is not None:
        env["CI"] = ci
    # The repository's pytest.ini, as `make test` runs (its -rs prints the skip line).
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-c", str(TESTS.parent / "pytest.ini"), "--rootdir", str(tmp_path),
                           str(tmp_path / "test_probe.py")],
                          check=False, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("ci", [None, "", "false"])
def test_missing_document_skips_with_one_line_naming_it(tmp_path, ci):
    out = _run(tmp_path, ci)
    missing = str(tmp_path / "no-shared" / "specs" / "openai-openapi.json")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 skipped" in out.stdout
    lines = [line for line in out.stdout.splitlines() if line.startswith("SKIPPED")]
    assert len(lines) == 1 and missing in lines[0], out.stdout


@pytest.mark.parametrize("ci", ["true", "TRUE"])
def test_missing_document_fails_under_ci(tmp_path, ci):
    out = _run(tmp_path, ci)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "2 failed" in out.stdout and "required when CI=true" in out.stdout


def test_present_document_is_read(tmp_path):
    """The override points at a real copy: the probe's bodies are checked (and fail: {} is no file)."""
    import openai_spec

    if not openai_spec.SPEC_PATH.is_file():
        openai_spec.require_spec()
    shared = tmp_path / "no-shared" / "specs"
    shared.mkdir(parents=True)
    (shared / "openai-openapi.json").write_bytes(openai_spec.SPEC_PATH.read_bytes())
    out = _run(tmp_path, None)
    assert "2 failed" in out.stdout and "SKIPPED" not in out.stdout, out.stdout
