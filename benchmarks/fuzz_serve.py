"""Fuzzing kaito-serve, or kaito-rag (`--service rag`), with schemathesis: requests generated from its own
/openapi.json (valid ones and invalid ones, every route), each answer checked against the document.

    .venv/bin/python benchmarks/fuzz_serve.py --max-time 600      # starts kaito-serve (transformers, default model)
    .venv/bin/python benchmarks/fuzz_serve.py --url http://127.0.0.1:5000 --api-key KEY --max-examples 30 --seed 1
    .venv/bin/python benchmarks/fuzz_serve.py --service rag --max-time 600    # starts kaito-rag (retrieve-only)

Checks: every schemathesis check but `positive_data_acceptance` (a request the schema allows may
still be refused for what a schema cannot say: an unknown model, more than the context window, more
sequences than the server runs, text with NUL or a lone surrogate). Prints what the JSON report
says as one JSON line: requests (test cases), server_errors (5xx), schema_violations (status,
content type, headers or body not as declared), other_failures (other checks: invalid data
accepted, auth ignored, wrong answer to an undeclared method, ...), no_answer (timeouts, lost
connections) and tool_errors (schemathesis failing to generate or run a case), with `served`, the
server's own count of the run's answers by route and status (kaito:requests_total, rag_requests_total).
Exits 1 when any count but requests is not 0. For kaito-rag, what a schema cannot say is also metadata
nested too deep, an index that does not exist, a path outside the storage directory, an answer asked
of a retrieve-only service.

A run depends on its seed alone: schemathesis's example database (which replays what earlier runs in this
folder found) is off. A response slower than a minute counts as a failure (`--max-response-time`), one without an answer
in two minutes as an error.

This file is also the run's schemathesis hooks file (SCHEMATHESIS_HOOKS): a generated generation
request that carries a model name asks for the served model (else nearly every one would be a 404
for an unknown model), for at most GEN_TOKENS new tokens and MAX_CHOICES choices (a generated
max_tokens of 5000, or 16 choices of long prompts, is minutes of work on a CPU: load, not a finding);
a completion request's integer `best_of` and string `suffix` (refused by the transformers backend) are
dropped and its prompt token ids brought into 0..TOKEN_IDS-1, and a valid (positive) generation request
loses the lone surrogates and NUL characters the schema allows in its strings, and an empty prompt (else
nearly every one would be a 400 and none would reach the engine); invalid values are left as generated.
The fuzzing phase goes through the hook, the coverage phase's
boundary cases do not (their model names are mostly unknown: they test the validation in front).
For kaito-rag, a generated index name (path or body) that is valid becomes FUZZ_INDEX, an index the
run starts with a few documents, except where the request deletes an index: so generated requests reach
listing, retrieval, updates and deletes instead of a 404 for an index that does not exist.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import schemathesis

GEN_TOKENS = 8
MAX_CHOICES = 2
TOKEN_IDS = 1000
MODEL_ENV = "KAITO_FUZZ_MODEL"
SERVER_ERRORS = {"ST101", "ST102"}  # 5xx; a 5xx with an undeclared content type
SCHEMA_VIOLATIONS = {f"ST1{n:02d}" for n in range(3, 12)}  # status, content type, headers, body not as declared
CHECKS = ["--checks", "all", "--exclude-checks", "positive_data_acceptance"]
FUZZ_INDEX = "fuzz"
SEED_DOCUMENTS = [{"doc_id": f"seed-{i}", "text": text, "metadata": {"n": i}} for i, text in enumerate([
    "The Lumen-9 telescope was assembled in Reykjavik in the year 2031.",
    "Kelp forests off the coast of Namibia grow up to thirty centimetres per day.",
    "The vault of the Zorblax company opens with the password tangerine-42."])]


@schemathesis.hook
def map_body(context, body):
    op = context.operation
    if op is None or not op.path.endswith("completions") or not isinstance(body, dict):
        return body
    if isinstance(body.get("model"), str):
        body["model"] = os.environ.get(MODEL_ENV, "smollm2-135m-instruct")
    for key, most in (("max_tokens", GEN_TOKENS), ("max_completion_tokens", GEN_TOKENS), ("n", MAX_CHOICES)):
        value = body.get(key)
        if type(value) is int and value > most:
            body[key] = most
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:  # null: the whole context
        body["max_tokens"] = GEN_TOKENS
    if op.path.endswith("/v1/completions"):  # what the schema allows and the transformers backend refuses
        if type(body.get("best_of")) is int:
            body["best_of"] = None
        if isinstance(body.get("suffix"), str):
            body["suffix"] = None
        prompt = body.get("prompt")
        if isinstance(prompt, list):
            body["prompt"] = [token_ids(p) if isinstance(p, list) else p for p in token_ids(prompt)]
    return body


def valid_text(value):
    """`value` with lone surrogates and NUL characters taken out of every string (keys too): a request the
    schema calls valid that kaito-serve refuses for its text alone (400) would never reach the engine."""
    if isinstance(value, str):
        return "".join(c for c in value if c != "\x00" and not 0xD800 <= ord(c) <= 0xDFFF)
    if isinstance(value, list):
        return [valid_text(v) for v in value]
    if isinstance(value, dict):
        return {valid_text(k): valid_text(v) for k, v in value.items()}
    return value


def token_ids(values: list) -> list:
    """Integers of a generated prompt made ids every vocabulary has (0..TOKEN_IDS-1); others left as generated."""
    return [abs(v) % TOKEN_IDS if type(v) is int else v for v in values]


@schemathesis.hook
def map_case(context, case):
    if case.operation.method.upper() == "DELETE":
        return case
    body = case.meta and case.meta.components.get("body")
    if (case.operation.path.endswith("completions") and isinstance(case.body, dict) and body
            and body.mode.value == "positive"):  # valid JSON may still hold text no model can take
        case.body = valid_text(case.body)
        if case.body.get("prompt") == "":
            case.body["prompt"] = "Hello"
    for where, values in (("path", case.path_parameters), ("body", case.body)):
        if isinstance(values, dict) and isinstance(values.get("index_name"), str):
            info = case.meta and case.meta.components.get(where)
            if info and info.mode.value == "positive":  # invalid (negative) values are left as generated
                values["index_name"] = FUZZ_INDEX
    return case


def fuzz(url: str, api_key: str | None, model: str, report_dir: Path, *, seed: int, max_examples: int | None,
         max_time: int | None, workers: int) -> dict:
    """Run schemathesis against `url` and summarise its JSON report."""
    argv = [sys.executable, "-m", "schemathesis.cli", "run", f"{url}/openapi.json", "--seed", str(seed),
            "--workers", str(workers), "--generation-database", "none", "--request-timeout", "120",
            "--max-response-time", "60", *CHECKS, "--report", "json",
            "--report-dir", str(report_dir), "--no-color"]
    if api_key:
        argv += ["--header", f"Authorization: Bearer {api_key}"]
    if max_examples:
        argv += ["--max-examples", str(max_examples)]
    if max_time:
        argv += ["--max-time", str(max_time)]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": str(Path(__file__).resolve()), MODEL_ENV: model}
    before = served(url, api_key)
    started = time.monotonic()
    run = subprocess.run(argv, env=env, capture_output=True, text=True)
    reports = sorted(report_dir.glob("json-*.json"))
    if not reports:
        raise RuntimeError(f"schemathesis wrote no report (exit {run.returncode}):\n{run.stdout[-4000:]}{run.stderr}")
    report = json.loads(reports[-1].read_text())

    def failures(codes) -> int:
        return sum(f.get("count", 1) for f in report["failures"] if codes(f["code"]))

    no_answer = sum(e.get("count", 1) for e in report["errors"] if e["title"] == "Network Error")
    return {
        "requests": report["test_cases"]["generated"],
        "server_errors": failures(SERVER_ERRORS.__contains__),
        "schema_violations": failures(SCHEMA_VIOLATIONS.__contains__),
        "other_failures": failures(lambda c: c not in SERVER_ERRORS | SCHEMA_VIOLATIONS),
        "no_answer": no_answer,
        "tool_errors": sum(e.get("count", 1) for e in report["errors"]) - no_answer,
        "served": {route: {status: n - before.get(route, {}).get(status, 0) for status, n in statuses.items()}
                   for route, statuses in served(url, api_key).items()},
        "seconds": round(time.monotonic() - started),
        "seed": seed,
        "failures": [f"{f['code']} {f['title']}: {', '.join(f['operations'])}" for f in report["failures"]],
        "output": run.stdout[-6000:] if run.returncode else "",
    }


def served(url: str, api_key: str | None) -> dict[str, dict[str, int]]:
    """The server's answers by route and status, from its kaito:requests_total counter (transformers
    backend) or rag_requests_total (kaito-rag; methods added up); empty for another server."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    text = httpx.get(f"{url}/metrics", headers=headers, timeout=30).text
    counts: dict[str, dict[str, int]] = {}
    for m in re.finditer(r'^(?:kaito:|rag_)requests_total\{(?:method="[^"]*",)?route="([^"]*)",status="(\d+)"\} (\S+)$',
                         text, re.M):
        counts.setdefault(m[1], {})[m[2]] = counts.get(m[1], {}).get(m[2], 0) + int(float(m[3]))
    return counts


def seed_index(url: str, api_key: str | None) -> None:
    r = httpx.post(f"{url}/index", json={"index_name": FUZZ_INDEX, "documents": SEED_DOCUMENTS},
                   headers={"Authorization": f"Bearer {api_key}"} if api_key else {}, timeout=120)
    r.raise_for_status()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--service", choices=["serve", "rag"], default="serve", help="kaito-serve (default) or kaito-rag")
    p.add_argument("--url", help="a running server (default: start one: kaito-serve on the transformers backend and "
                                 "the default model, or kaito-rag retrieve-only)")
    p.add_argument("--api-key", help="its API key")
    p.add_argument("--model", default="smollm2-135m-instruct", help="the served model name (default %(default)s)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--max-examples", type=int, help="test cases per route and phase")
    p.add_argument("--max-time", type=int, help="seconds for the whole run (fuzzing repeats until then)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--report-dir", type=Path, help="schemathesis's JSON report (default: a temporary folder)")
    args = p.parse_args()
    if not (args.max_examples or args.max_time):
        p.error("give --max-examples or --max-time")
    report_dir = args.report_dir or Path(tempfile.mkdtemp(prefix="fuzz-serve-"))
    report_dir.mkdir(parents=True, exist_ok=True)
    proc = None
    url, api_key = args.url, args.api_key
    if url is None:
        sys.path.insert(0, str(Path(__file__).parent))
        import procs

        port, api_key = procs.free_port(), "fuzz-key"
        url = f"http://127.0.0.1:{port}"
        if args.service == "rag":  # retrieve-only
            rag = [sys.executable, "-m", "kaito.ragservice.cli", "--host", "127.0.0.1", "--port", str(port),
                   "--storage-dir", str(report_dir / "storage"), "--api-key", api_key]
            proc = procs.start(rag, port, report_dir / "kaito-rag.log", env={"LLM_INFERENCE_URL": ""})
        else:
            serve = [sys.executable, "-m", "kaito.runtime.cli", "--backend", "transformers", "--host", "127.0.0.1",
                     "--port", str(port), "--adapters-dir", str(report_dir / "no-adapters"), "--api-key", api_key]
            proc = procs.start(serve, port, report_dir / "kaito-serve.log")
    try:
        if args.service == "rag":
            seed_index(url, api_key)
        summary = fuzz(url, api_key, args.model, report_dir, seed=args.seed, max_examples=args.max_examples,
                       max_time=args.max_time, workers=args.workers)
    finally:
        if proc is not None:
            procs.stop(proc)
    print(json.dumps(summary))
    bad = ("server_errors", "schema_violations", "other_failures", "no_answer", "tool_errors")
    return 1 if any(summary[k] for k in bad) else 0


if __name__ == "__main__":
    sys.exit(main())
