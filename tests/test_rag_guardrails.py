"""kaito-rag's output guardrails in-process: each scanner of upstream's guardrails.yaml format with its
options, the policy's parsing (bad entries skipped with the reason), the hot reload of the file (a
ConfigMap-style symlink swap included), fail open / fail closed, and the streaming window. Through HTTP
with kaito-serve as the LLM: tests/test_ragservice.py."""

import os
import time

import pytest
from kaito.ragservice.guardrails import (
    DEFAULT_BLOCK_MESSAGE,
    Guardrails,
    GuardrailsFailed,
    PolicyError,
    apply,
    parse_policy,
)
from prometheus_client import CollectorRegistry, generate_latest


def policy(yaml_text: str):
    p = parse_policy(yaml_text)
    assert not p.problems, p.problems
    return p


def run(yaml_text: str, text: str):
    return apply(policy(yaml_text), text)


def test_regex_search_all_fullmatch_and_allow_list():
    text = "Call 555-1234 or 555-9876."
    assert run("scanners: [{type: regex, patterns: ['\\d{3}-\\d{4}']}]", text).text == "Call [REDACTED] or 555-9876."
    assert run("scanners: [{type: regex, match_type: all, patterns: ['\\d{3}-\\d{4}']}]", text).text == \
        "Call [REDACTED] or [REDACTED]."
    assert run("scanners: [{type: regex, match_type: fullmatch, patterns: ['Call.*']}]", text).text == "[REDACTED]"
    allow = "scanners: [{type: regex, is_blocked: false, patterns: ['^Call']}]"
    assert run(allow, text).actions == [] and run(allow, "Hello").blocked  # an allow-list miss cannot be redacted
    assert run("action: block\nscanners: [{type: regex, patterns: ['555']}]", text).text == DEFAULT_BLOCK_MESSAGE


def test_ban_substrings_words_case_and_contains_all():
    text = "This is SECRET, and so are the secrets."
    assert run("scanners: [{type: ban_substrings, substrings: [secret]}]", text).text == \
        "This is [REDACTED], and so are the secrets."
    assert run("scanners: [{type: ban_substrings, match_type: str, substrings: [secret]}]", text).text == \
        "This is [REDACTED], and so are the [REDACTED]s."
    assert run("scanners: [{type: ban_substrings, case_sensitive: true, substrings: [secret]}]", text).actions == []
    both = "scanners: [{type: ban_substrings, contains_all: true, substrings: [secret, password]}]"
    assert run(both, text).actions == [] and run(both, "secret password").text == "[REDACTED] [REDACTED]"


def test_json_validity_repair_and_required_elements():
    assert run("scanners: [{type: json}]", 'ok {"a": 1}').actions == []
    assert run("scanners: [{type: json}]", 'fix {"a": 1,}').text == 'fix {"a": 1}'
    assert run("scanners: [{type: json, repair: false}]", 'bad {"a": 1,}').blocked
    assert run("scanners: [{type: json, required_elements: 2}]", '{"a": 1}').blocked
    assert run("scanners: [{type: json}]", "no json at all").actions == []


def test_reading_time_and_token_limit_truncate_or_block():
    words = " ".join(f"w{i}" for i in range(10))
    assert run("scanners: [{type: reading_time, max_time: 0.02, truncate: true}]", words).text == "w0 w1 w2 w3"
    assert run("scanners: [{type: reading_time, max_time: 0.02}]", words).blocked  # nothing to redact with
    out = run("scanners: [{type: token_limit, limit: 3}]", "one two three four five")
    assert out.text == "one two three" and out.truncated
    assert run("scanners: [{type: token_limit, limit: 100}]", "short").actions == []


def test_secrets_sensitive_and_invisible_text():
    text = "key AKIAIOSFODNN7EXAMPLE and token ghp_16C7e42F292c6912E7710c838347Ae178B4a end"
    assert run("scanners: [{type: secrets}]", text).text == "key ****** and token ****** end"
    partial = run("scanners: [{type: secrets, redact_mode: partial}]", text).text
    assert "AK..LE" in partial and "AKIAIOSFODNN7EXAMPLE" not in partial
    assert run("scanners: [{type: secrets}]", "The capital of France is Paris.").actions == []
    pii = "Mail jane.doe@example.com or call (415) 555-2671; card 4111 1111 1111 1111 from 10.0.0.12 in 2031."
    assert run("scanners: [{type: sensitive}]", pii).text == \
        "Mail <EMAIL> or call <PHONE>; card <CREDIT_CARD> from <IP_ADDRESS> in 2031."
    assert run("scanners: [{type: sensitive, detectors: [email]}]", pii).text.startswith("Mail <EMAIL> or call (415)")
    assert run("scanners: [{type: sensitive}]", "card 4111 1111 1111 1112").actions == []  # fails Luhn
    assert run("scanners: [{type: invisible_text}]", "pay\u200bpal\u202e").text == "paypal"


def test_actions_chain_and_first_block_wins():
    p = policy("""
blockMessage: nope
scanners:
  - {type: regex, patterns: ['\\d+'], match_type: all}
  - {type: ban_substrings, substrings: [forbidden], action: block}
""")
    assert apply(p, "room 12").text == "room [REDACTED]"
    out = apply(p, "room 12 is forbidden")
    assert out.text == "nope" and out.blocked and out.actions == [("regex", "redact"), ("ban_substrings", "block")]


def test_bad_entries_are_skipped_with_the_reason_and_a_bad_file_is_an_error():
    p = parse_policy("""
action: shout
scanners:
  - {type: toxicity}
  - {type: regex, patterns: ['(unclosed']}
  - {type: reading_time}
  - {type: sensitive, detectors: [email, dna]}
  - {type: ban_substrings, substrings: [x], case_sensitive: "no"}
  - {type: invisible_text}
""")
    assert [s.type for s in p.scanners] == ["invisible_text"] and p.action == "redact"
    reasons = "\n".join(why for _, why in p.problems)
    for needle in ("action 'shout'", "unknown scanner type 'toxicity'", "not a valid regular expression",
                   "max_time: Field required", "detectors.1", "case_sensitive"):
        assert needle in reasons, (needle, reasons)
    for bad in ("- just\n- a list", "scanners: [unclosed"):
        with pytest.raises(PolicyError):
            parse_policy(bad)


def write(path, text):
    """As a ConfigMap update does: a new file swapped in."""
    tmp = path.with_name(f".{path.name}.{time.monotonic_ns()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_policy_is_reloaded_from_a_configmap_style_symlink_swap(tmp_path):
    data1, data2 = tmp_path / "..2026_1", tmp_path / "..2026_2"
    for d, pattern in ((data1, "alpha"), (data2, "beta")):
        d.mkdir()
        (d / "guardrails.yaml").write_text(f"scanners: [{{type: regex, patterns: [{pattern}]}}]")
    (tmp_path / "..data").symlink_to(data1.name)
    (tmp_path / "guardrails.yaml").symlink_to("..data/guardrails.yaml")
    registry = CollectorRegistry()
    g = Guardrails(tmp_path / "guardrails.yaml", registry, interval=0.05)
    g.start()
    try:
        assert g.check("alpha beta").text == "[REDACTED] beta"
        tmp = tmp_path / "..data_tmp"
        tmp.symlink_to(data2.name)
        os.replace(tmp, tmp_path / "..data")  # how the kubelet updates a mounted ConfigMap
        deadline = time.monotonic() + 5
        while g.check("alpha beta").text != "alpha [REDACTED]" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert g.check("alpha beta").text == "alpha [REDACTED]"
        write(data2 / "guardrails.yaml", "scanners: [")  # broken: the previous policy stays
        time.sleep(0.5)
        assert g.check("alpha beta").text == "alpha [REDACTED]"
    finally:
        g.stop()
    metrics = generate_latest(registry).decode()
    assert 'guardrails_policy_reload_total{result="success"} 1.0' in metrics
    assert 'guardrails_policy_reload_total{result="failure"} 1.0' in metrics
    assert 'output_guardrails_actions_total{action="redact",scanner="regex"}' in metrics


def test_a_missing_policy_stops_the_start(tmp_path):
    with pytest.raises(PolicyError, match="cannot read the guardrails policy"):
        Guardrails(tmp_path / "nope.yaml", CollectorRegistry())


def test_fail_open_passes_the_answer_and_fail_closed_raises(tmp_path, monkeypatch):
    from kaito.ragservice import guardrails

    path = tmp_path / "g.yaml"
    path.write_text("scanners: [{type: secrets}]")

    def broken(text):
        raise RuntimeError("scanner crashed")

    monkeypatch.setattr(guardrails, "_detect_secrets", broken)  # a scanner failure, as a bad model load would be
    assert Guardrails(path, CollectorRegistry()).check("AKIAIOSFODNN7EXAMPLE").text == "AKIAIOSFODNN7EXAMPLE"
    with pytest.raises(GuardrailsFailed):
        Guardrails(path, CollectorRegistry(), fail_open=False).check("AKIAIOSFODNN7EXAMPLE")


def stream(g: Guardrails, pieces: list[str]) -> tuple[str, object]:
    guard = g.stream()
    out = "".join(guard.feed(p) for p in pieces) + guard.finish()
    return out, guard


def test_stream_window_catches_matches_split_across_chunks(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text("scanners: [{type: secrets}, {type: sensitive, detectors: [email]}]")
    g = Guardrails(path, CollectorRegistry(), holdback=40)
    text = "Use key AKIAIOSFODNN7EXAMPLE, mail ops@example.com. " * 3
    pieces = [text[i:i + 3] for i in range(0, len(text), 3)]  # 3-character deltas, as tokens arrive
    out, _ = stream(g, pieces)
    assert out == "Use key ******, mail <EMAIL>. " * 3
    guard = g.stream()
    released = [guard.feed(p) for p in pieces[:20]]
    assert len("".join(released)) <= 60 - 40  # at most what arrived, less the hold-back


def test_stream_block_and_length_limit_end_the_answer(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text("scanners: [{type: ban_substrings, substrings: [forbidden], action: block}]")
    g = Guardrails(path, CollectorRegistry(), holdback=16)
    out, guard = stream(g, ["This is fine. " * 3, "Now the forbidden part", " and more"])
    assert guard.blocked and out.endswith(DEFAULT_BLOCK_MESSAGE) and "forbidden" not in out
    path.write_text("scanners: [{type: token_limit, limit: 5}]")
    out, guard = stream(Guardrails(path, CollectorRegistry(), holdback=4), ["one two ", "three four ", "five six seven"])
    assert out == "one two three four five" and guard.done and not guard.blocked


def test_whole_response_scanners_are_named_for_streaming():
    p = policy("""
scanners:
  - {type: json}
  - {type: regex, patterns: [x], is_blocked: false}
  - {type: ban_substrings, substrings: [a, b], contains_all: true}
  - {type: regex, patterns: [y]}
  - {type: token_limit}
""")
    assert p.whole_response_scanners == ["json", "regex", "ban_substrings"]
