"""kaito-rag (retrieve-only, conftest.rag_server) fuzzed from its own OpenAPI document with schemathesis,
a bounded run with a fixed seed (benchmarks/fuzz_serve.py --service rag; its 10-minute run is in
ragservice/README.md):
no answer is a 5xx, and every answer's status, content type, headers and body are as the document
declares."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import REPO

pytest.importorskip("schemathesis", reason="schemathesis is in the dev extra")


def test_fuzzing_finds_no_server_error_and_no_schema_violation(rag_server, tmp_path):
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "fuzz_serve.py"), "--service", "rag",
                          "--url", rag_server.url, "--api-key", rag_server.api_key, "--seed", "1",
                          "--max-examples", "25", "--report-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert run.stdout.strip(), run.stderr[-4000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["requests"] >= 500, summary
    served = summary["served"]  # the hook's index name: generated requests reach retrieval and listing
    assert served["/retrieve"]["200"] > 0 and served["/indexes/{index_name}/documents"]["200"] > 0, served
    found = {k: summary[k] for k in ("server_errors", "schema_violations", "other_failures", "no_answer", "tool_errors")}
    assert found == dict.fromkeys(found, 0), f"{summary['failures']}\n{summary['output']}"
    assert run.returncode == 0
