"""Output guardrails: upstream KAITO's `guardrails.yaml` policy applied to the assistant text of
`/v1/chat/completions` answers, streamed or not.

The policy (a ConfigMap mounted as a file) names scanners in order, each with an action:
`redact` replaces what it found (or truncates, for the length limits), `block` replaces the whole answer
with `blockMessage`. A scanner that finds something it cannot redact (invalid JSON, an allow-list
regex that did not match, a reading time over the limit without `truncate`) blocks. The scanners are
written here, on the standard library plus three small field libraries: detect-secrets (`secrets`),
phonenumbers (`sensitive` phone numbers), json-repair (`json` with `repair`); tiktoken counts tokens.

Policy parsing follows upstream: an entry with an unknown type or a bad field is skipped (with a
warning naming the problem, and counted in `output_guardrails_scanner_build_total`) and the others
still run. A file that is not a YAML mapping is an error: at start-up kaito-rag refuses to start, on a
reload the previous policy stays. The file is polled once a second (by the identity and mtime of the
file its path resolves to, so a ConfigMap's symlink swap counts) and a new policy replaces the old
one atomically.

Streams are scanned through a bounded hold-back window (`StreamGuard`): the last `holdback`
characters are kept unsent, so any match up to that length is caught before the client sees it.
Scanners that need the whole answer (`json`, `ban_substrings` with `contains_all`, `regex` with
`fullmatch` or `is_blocked: false`) refuse `stream: true` with a 400 instead.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import os
import re
import threading
import time
import unicodedata
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from prometheus_client import CollectorRegistry, Counter, Gauge
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

log = logging.getLogger("kaito.ragservice.guardrails")

DEFAULT_BLOCK_MESSAGE = "The model output was blocked by output guardrails."
FAILED_MESSAGE = "Output guardrails failed while scanning the model response."
REDACTED = "[REDACTED]"
WORDS_PER_MINUTE = 200  # reading_time's reading speed
Action = Literal["redact", "block"]


class PolicyError(ValueError):
    """The policy file cannot be used at all (missing, not YAML, not a mapping)."""


class GuardrailsFailed(RuntimeError):
    """A scanner raised while the guardrails fail closed (500)."""


@dataclass
class Hit:
    """What a scanner found: the text with it redacted, or None when it cannot be redacted (blocks)."""

    text: str | None


class Scanner(BaseModel):
    """One policy entry. Field names are upstream's (snake_case in the YAML); values are taken as YAML
    typed them (strict: "false" is no boolean)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    whole_response: ClassVar[bool] = False  # needs the complete answer: no streaming
    length_limit: ClassVar[bool] = False  # judged on all the text sent so far, not a window of it

    type: str
    action: Action | None = Field(None, description="redact or block; default: the policy's action")

    def scan(self, text: str) -> Hit | None:
        raise NotImplementedError

    @property
    def streamable(self) -> bool:
        return not self.whole_response


def _replace(text: str, spans: list[tuple[int, int]], replacement) -> str:
    """Text with the non-overlapping spans (start, end) replaced by replacement(found text)."""
    out, last = [], 0
    for start, end in sorted(spans):
        if start < last:
            continue
        out += [text[last:start], replacement(text[start:end])]
        last = end
    return "".join(out) + text[last:]


class RegexScanner(Scanner):
    type: Literal["regex"]
    patterns: list[str] = Field(min_length=1)
    match_type: Literal["search", "fullmatch", "all"] = "search"
    is_blocked: bool = Field(True, description="false: an allow-list, the answer must match a pattern")

    @field_validator("patterns")
    @classmethod
    def _compiles(cls, patterns: list[str]) -> list[str]:
        for p in patterns:
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"pattern {p!r} is not a valid regular expression: {e}") from e
        return patterns

    @cached_property
    def compiled(self) -> list[re.Pattern]:
        return [re.compile(p) for p in self.patterns]

    @property
    def streamable(self) -> bool:
        return self.is_blocked and self.match_type != "fullmatch"

    def _spans(self, pattern: re.Pattern, text: str) -> list[tuple[int, int]]:
        if self.match_type == "fullmatch":
            return [(0, len(text))] if pattern.fullmatch(text) else []
        if self.match_type == "all":
            return [m.span() for m in pattern.finditer(text) if m.end() > m.start()]
        m = pattern.search(text)
        return [m.span()] if m and m.end() > m.start() else []

    def scan(self, text: str) -> Hit | None:
        for pattern in self.compiled:  # the first pattern that matches decides
            spans = self._spans(pattern, text)
            if spans:
                return Hit(_replace(text, spans, lambda _: REDACTED)) if self.is_blocked else None
        return None if self.is_blocked else Hit(None)


class BanSubstringsScanner(Scanner):
    type: Literal["ban_substrings"]
    substrings: list[str] = Field(min_length=1)
    match_type: Literal["str", "word"] = "word"
    case_sensitive: bool = False
    contains_all: bool = False

    @property
    def streamable(self) -> bool:
        return not self.contains_all

    @cached_property
    def compiled(self) -> list[re.Pattern]:
        flags = 0 if self.case_sensitive else re.IGNORECASE
        edge = r"\b" if self.match_type == "word" else ""
        return [re.compile(f"{edge}{re.escape(s)}{edge}", flags) for s in self.substrings if s]

    def scan(self, text: str) -> Hit | None:
        found = [p for p in self.compiled if p.search(text)]
        if not found or (self.contains_all and len(found) < len(self.compiled)):
            return None
        spans = [m.span() for p in found for m in p.finditer(text)]
        return Hit(_replace(text, spans, lambda _: REDACTED))


class JSONScanner(Scanner):
    """Every JSON object or array in the answer must parse (with `repair`, json-repair may fix it), and
    at least `required_elements` of them must be there."""

    type: Literal["json"]
    whole_response: ClassVar[bool] = True
    required_elements: int = Field(0, ge=0)
    repair: bool = True

    def scan(self, text: str) -> Hit | None:
        blocks, broken, fixed = _json_blocks(text), 0, text
        valid = 0
        for block in blocks:
            try:
                json.loads(block)
                valid += 1
                continue
            except ValueError:
                broken += 1
            if self.repair:
                from json_repair import repair_json

                repaired = repair_json(block)
                if repaired not in ("", '""', "{}", "[]") or block.strip() in ("{}", "[]"):
                    fixed, valid = fixed.replace(block, repaired, 1), valid + 1
                    broken -= 1
        if not broken and valid >= self.required_elements and fixed == text:
            return None
        return Hit(fixed if not broken and valid >= self.required_elements else None)


def _json_blocks(text: str) -> list[str]:
    """Balanced {...} / [...] spans, outermost only, string literals respected."""
    blocks, depth, start, in_string, escaped = [], 0, 0, False, False
    for i, ch in enumerate(text):
        if in_string:
            escaped, in_string = (not escaped and ch == "\\"), in_string and (escaped or ch != '"')
            continue
        if ch == '"' and depth:
            in_string = True
        elif ch in "{[":
            start = i if depth == 0 else start
            depth += 1
        elif ch in "}]" and depth:
            depth -= 1
            if depth == 0:
                blocks.append(text[start:i + 1])
    if depth:  # an unclosed block runs to the end
        blocks.append(text[start:])
    return blocks


class ReadingTimeScanner(Scanner):
    type: Literal["reading_time"]
    length_limit: ClassVar[bool] = True
    max_time: float = Field(gt=0, description="minutes, at 200 words a minute")
    truncate: bool = False

    def scan(self, text: str) -> Hit | None:
        limit = int(self.max_time * WORDS_PER_MINUTE)
        words = list(re.finditer(r"\S+", text))
        if len(words) <= limit:
            return None
        return Hit(text[:words[limit - 1].end()] if self.truncate and limit else None)


class TokenLimitScanner(Scanner):
    type: Literal["token_limit"]
    length_limit: ClassVar[bool] = True
    limit: int = Field(4096, gt=0)
    encoding_name: str = Field("cl100k_base", min_length=1)
    model_name: str | None = Field(None, min_length=1)

    @cached_property
    def encoding(self):
        import tiktoken

        _offline_tiktoken()
        return tiktoken.encoding_for_model(self.model_name) if self.model_name else tiktoken.get_encoding(
            self.encoding_name)

    def scan(self, text: str) -> Hit | None:
        tokens = self.encoding.encode(text, disallowed_special=())
        if len(tokens) <= self.limit:
            return None
        return Hit(self.encoding.decode(tokens[:self.limit]))


def _offline_tiktoken() -> None:
    """tiktoken downloads its encodings on first use; llama-index-core ships cl100k_base, used when no
    cache is configured (other encodings need TIKTOKEN_CACHE_DIR or the network)."""
    if "TIKTOKEN_CACHE_DIR" not in os.environ:
        import llama_index.core

        os.environ["TIKTOKEN_CACHE_DIR"] = str(Path(llama_index.core.__file__).parent / "_static" / "tiktoken_cache")


class SecretsScanner(Scanner):
    """Credentials found by detect-secrets' plugins and filters (cloud keys, tokens, private keys, keyword
    assignments, high-entropy strings), as it scans a file. A finding is widened to the whole token it
    sits in (detect-secrets reports some only by their prefix), a private key to its whole PEM block."""

    type: Literal["secrets"]
    redact_mode: Literal["all", "partial", "hash"] = "all"

    def _redacted(self, secret: str) -> str:
        if self.redact_mode == "partial" and len(secret) > 6:
            return f"{secret[:2]}..{secret[-2:]}"
        if self.redact_mode == "hash":
            return hashlib.sha256(secret.encode()).hexdigest()[:16]
        return "******"

    def scan(self, text: str) -> Hit | None:
        spans = []
        for kind, value in _detect_secrets(text):
            for m in re.finditer(re.escape(value), text):
                if kind == "Private Key":
                    block = PEM.search(text, max(0, m.start() - 16))
                    spans.append(block.span() if block else m.span())
                else:
                    start, end = m.span()
                    while start > 0 and TOKEN_CHAR.match(text[start - 1]):
                        start -= 1
                    while end < len(text) and TOKEN_CHAR.match(text[end]):
                        end += 1
                    spans.append((start, end))
        return Hit(_replace(text, spans, self._redacted)) if spans else None


PEM = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(?:-----END [A-Z ]*PRIVATE KEY-----|\Z)", re.DOTALL)
TOKEN_CHAR = re.compile(r"[A-Za-z0-9_\-+/=.]")
_SECRETS_LOCK = threading.Lock()


def _detect_secrets(text: str) -> list[tuple[str, str]]:
    """(type, value) of what detect-secrets finds in the text, scanned as a file (its public API; the
    file lives in memory-backed /dev/shm where there is one)."""
    import tempfile

    from detect_secrets.core.scan import scan_file
    from detect_secrets.settings import default_settings

    folder = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.NamedTemporaryFile("w", suffix=".txt", dir=folder) as f:
        f.write(text)
        f.flush()
        with _SECRETS_LOCK, default_settings():  # detect-secrets keeps its settings in a global
            return sorted({(s.type, s.secret_value) for s in scan_file(f.name) if s.secret_value},
                          key=lambda found: -len(found[1]))


SENSITIVE = ("email", "phone", "credit_card", "ip_address")
EMAIL = re.compile(r"\b[A-Za-z0-9._%+\-]+@[A-Za-z0-9.\-]+\.[A-Za-z]{2,}\b")
CARD = re.compile(r"(?<!\d)(?:\d[ -]?){12,18}\d(?!\d)")
IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d.])")


def _luhn(digits: str) -> bool:
    total = 0
    for i, d in enumerate(reversed(digits)):
        n = int(d) * (2 if i % 2 else 1)
        total += n - 9 if n > 9 else n
    return total % 10 == 0


class SensitiveScanner(Scanner):
    """Personal data: e-mail addresses, phone numbers (phonenumbers: valid numbers, international or US
    national), Luhn-valid card numbers and IPv4 addresses, replaced by `<EMAIL>`, `<PHONE>`, ...."""

    type: Literal["sensitive"]
    detectors: list[Literal["email", "phone", "credit_card", "ip_address"]] = Field(
        default_factory=lambda: list(SENSITIVE), min_length=1)

    def _find(self, text: str) -> list[tuple[int, int, str]]:
        spans = []
        if "email" in self.detectors:
            spans += [(*m.span(), "email") for m in EMAIL.finditer(text)]
        if "credit_card" in self.detectors:
            spans += [(*m.span(), "credit_card") for m in CARD.finditer(text)
                      if 13 <= len(d := re.sub(r"\D", "", m.group())) <= 19 and _luhn(d)]
        if "ip_address" in self.detectors:
            spans += [(*m.span(), "ip_address") for m in IPV4.finditer(text) if _is_ipv4(m.group())]
        if "phone" in self.detectors:
            import phonenumbers

            taken = [(a, b) for a, b, _ in spans]
            spans += [(m.start, m.end, "phone") for m in phonenumbers.PhoneNumberMatcher(text, "US")
                      if not any(a < m.end and m.start < b for a, b in taken)]
        return spans

    def scan(self, text: str) -> Hit | None:
        found = self._find(text)
        if not found:
            return None
        kinds = {(a, b): kind for a, b, kind in found}
        out, last = [], 0
        for (a, b), kind in sorted(kinds.items()):
            if a >= last:
                out += [text[last:a], f"<{kind.upper()}>"]
                last = b
        return Hit("".join(out) + text[last:])


def _is_ipv4(text: str) -> bool:
    try:
        ipaddress.IPv4Address(text)
        return True
    except ValueError:
        return False


INVISIBLE = {"Cf", "Co", "Cn"}  # format characters (zero-width, bidi controls), private use, unassigned


class InvisibleTextScanner(Scanner):
    type: Literal["invisible_text"]

    def scan(self, text: str) -> Hit | None:
        kept = "".join(ch for ch in text if unicodedata.category(ch) not in INVISIBLE)
        return Hit(kept) if len(kept) != len(text) else None


ScannerEntry = Annotated[RegexScanner | BanSubstringsScanner | JSONScanner | ReadingTimeScanner | TokenLimitScanner
                         | SecretsScanner | SensitiveScanner | InvisibleTextScanner, Field(discriminator="type")]
SCANNER = TypeAdapter(ScannerEntry)
SCANNER_TYPES = ("regex", "ban_substrings", "json", "reading_time", "secrets", "sensitive", "invisible_text",
                 "token_limit")


class Policy(BaseModel):
    """A loaded guardrails.yaml."""

    model_config = ConfigDict(populate_by_name=True, frozen=True)

    action: Action = "redact"
    block_message: str = Field(DEFAULT_BLOCK_MESSAGE, alias="blockMessage", min_length=1)
    scanners: tuple[Any, ...] = ()
    problems: tuple[tuple[str, str], ...] = Field((), exclude=True, description="(type, why) of entries skipped")

    def action_of(self, scanner: Scanner) -> Action:
        return scanner.action or self.action

    @property
    def whole_response_scanners(self) -> list[str]:
        return [s.type for s in self.scanners if not s.streamable]


def parse_policy(text: str, source: str = "policy", load_encodings: bool = True) -> Policy:
    """A policy from guardrails.yaml text. Bad scanner entries are skipped and listed in `problems`.
    load_encodings: check token_limit's tiktoken encoding now (the operator, without tiktoken, does not)."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise PolicyError(f"{source} is not valid YAML: {e}") from e
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise PolicyError(f"{source} must be a YAML mapping (action, blockMessage, scanners), not "
                          f"{type(raw).__name__}")
    problems: list[tuple[str, str]] = []
    action = raw.get("action", "redact")
    if action is not None and str(action).lower() not in ("redact", "block"):
        problems.append(("policy", f"action {action!r} is not redact or block: redact is used"))
        action = "redact"
    message = raw.get("blockMessage") or DEFAULT_BLOCK_MESSAGE
    entries = raw.get("scanners") or []
    if not isinstance(entries, list):
        problems.append(("policy", "scanners must be a list: no scanner is used"))
        entries = []
    scanners = []
    for i, entry in enumerate(entries):
        where = f"scanners[{i}]"
        if not isinstance(entry, dict):
            problems.append(("unknown", f"{where}: not a mapping"))
            continue
        entry = {k: (v.lower() if k in ("type", "action") and isinstance(v, str) else v) for k, v in entry.items()}
        kind = entry.get("type")
        if kind not in SCANNER_TYPES:
            problems.append(("unknown", f"{where}: unknown scanner type {kind!r}; known: {', '.join(SCANNER_TYPES)}"))
            continue
        try:
            scanner = SCANNER.validate_python(entry)
            if load_encodings and isinstance(scanner, TokenLimitScanner):
                scanner.encoding  # noqa: B018  (an unknown encoding is a problem of the policy, found now)
        except ValidationError as e:
            problems.append((kind, f"{where} ({kind}): " + "; ".join(
                f"{'.'.join(str(x) for x in err['loc'][1:]) or 'entry'}: {err['msg']}" for err in e.errors())))
            continue
        except Exception as e:  # tiktoken: unknown encoding or model, or no cached encoding offline
            problems.append((kind, f"{where} ({kind}): {e}"))
            continue
        scanners.append(scanner)
    return Policy(action=str(action or "redact").lower(), block_message=str(message), scanners=tuple(scanners),
                  problems=tuple(problems))


@dataclass
class Outcome:
    text: str
    blocked: bool = False
    truncated: bool = False
    actions: list[tuple[str, str]] = field(default_factory=list)  # (scanner type, action taken)


def apply(policy: Policy, text: str, scanners=None) -> Outcome:
    """Runs the scanners in order on the answer; the first block ends it, redactions accumulate."""
    out = Outcome(text)
    for scanner in policy.scanners if scanners is None else scanners:
        hit = scanner.scan(out.text)
        if hit is None:
            continue
        if policy.action_of(scanner) == "block" or hit.text is None:
            out.actions.append((scanner.type, "block"))
            out.text, out.blocked = policy.block_message, True
            return out
        out.actions.append((scanner.type, "redact"))
        out.truncated |= scanner.length_limit
        out.text = hit.text
    return out


class GuardrailsMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.actions = Counter("output_guardrails_actions", "Guardrail actions taken, by scanner and action",
                               ["scanner", "action"], registry=registry)
        self.errors = Counter("output_guardrails_errors", "Scanner failures while scanning a response",
                              ["scanner"], registry=registry)
        self.loads = Counter("output_guardrails_policy_load", "Policy file loads by result", ["result"],
                             registry=registry)
        self.builds = Counter("output_guardrails_scanner_build", "Policy scanner entries by type and result",
                              ["type", "result"], registry=registry)
        self.reloads = Counter("guardrails_policy_reload", "Policy reloads by result (success, noop, failure)",
                               ["result"], registry=registry)
        self.loaded = Gauge("guardrails_policy_loaded_timestamp_seconds", "When the active policy was loaded",
                            registry=registry)
        self.scanners = Gauge("guardrails_active_policy_scanners", "Scanners in the active policy", registry=registry)


class Guardrails:
    """The active policy of a policy file, hot reloaded, and the checks that apply it."""

    def __init__(self, path: Path, registry: CollectorRegistry, fail_open: bool = True, hot_reload: bool = True,
                 holdback: int = 128, interval: float = 1.0) -> None:
        self.path, self.fail_open, self.hot_reload = Path(path), fail_open, hot_reload
        self.holdback, self.interval = holdback, interval
        self.metrics = GuardrailsMetrics(registry)
        self._stamp = self._file_stamp()
        self.policy = self._load()  # PolicyError at start-up: kaito-rag does not start without its policy
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _file_stamp(self) -> tuple | None:
        try:
            st = os.stat(self.path)  # follows the ConfigMap's ..data symlink
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size, os.path.realpath(self.path)

    def _load(self) -> Policy:
        try:
            text = self.path.read_text()
        except OSError as e:
            self.metrics.loads.labels("failure").inc()
            raise PolicyError(f"cannot read the guardrails policy {self.path}: {e.strerror or e}") from e
        try:
            policy = parse_policy(text, str(self.path))
        except PolicyError:
            self.metrics.loads.labels("failure").inc()
            raise
        self.metrics.loads.labels("success").inc()
        for kind, problem in policy.problems:
            log.warning("guardrails policy entry skipped", extra={"path": str(self.path), "problem": problem})
            self.metrics.builds.labels(kind, "failure").inc()
        for s in policy.scanners:
            self.metrics.builds.labels(s.type, "success").inc()
        self.metrics.loaded.set(time.time())
        self.metrics.scanners.set(len(policy.scanners))
        log.info("guardrails policy loaded", extra={"path": str(self.path), "scanners": len(policy.scanners)})
        return policy

    def reload(self) -> str:
        """Loads the file again if it changed: success, noop or failure (the old policy stays)."""
        stamp = self._file_stamp()
        if stamp == self._stamp:
            return "noop"
        self._stamp = stamp
        try:
            policy = self._load()
        except PolicyError as e:
            log.error("guardrails policy reload failed; the previous policy stays", extra={"error": str(e)})
            result = "failure"
        else:
            result = "noop" if policy == self.policy else "success"
            self.policy = policy
        self.metrics.reloads.labels(result).inc()
        return result

    def start(self) -> None:
        if self.hot_reload and self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="guardrails-reload", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.reload()
            except Exception:  # the watcher must outlive anything a reload raises
                log.exception("guardrails policy watch failed")

    def check(self, text: str, policy: Policy | None = None, scanners=None) -> Outcome:
        """The policy applied to one answer, counted; a scanner failure passes it through (fail open) or
        raises GuardrailsFailed (fail closed)."""
        policy = policy or self.policy
        try:
            out = apply(policy, text, scanners)
        except Exception as e:
            failed = next((s.type for s in (scanners or policy.scanners) if _raises(s, text)), "unknown")
            self.metrics.errors.labels(failed).inc()
            log.exception("guardrails scanner failed", extra={"scanner": failed, "fail_open": self.fail_open})
            if not self.fail_open:
                raise GuardrailsFailed(FAILED_MESSAGE) from e
            return Outcome(text)
        for scanner, action in out.actions:
            self.metrics.actions.labels(scanner, action).inc()
        if out.actions:
            log.info("guardrails triggered", extra={"actions": out.actions})
        return out

    def stream(self) -> StreamGuard:
        return StreamGuard(self, self.policy)


def _raises(scanner: Scanner, text: str) -> bool:
    try:
        scanner.scan(text)
        return False
    except Exception:
        return True


class StreamGuard:
    """Scans a streamed answer through a window: `feed` returns the text that may be sent now, `finish`
    the rest. The last `holdback` characters stay unsent, and text is released only up to a cut that no
    match crosses (a whitespace where scanning the two sides apart gives what scanning them together
    gives), so a match up to `holdback` long is redacted whole. A run of more than 8 x `holdback`
    characters without such a cut is released anyway (the bound). Regex `search` redacts every match
    here (a stream has no single first match). Length limits are judged on everything sent so far; when
    one is reached the answer ends there (redact: truncated) or is blocked. After a block the client gets
    the block message and the stream ends: text sent before it cannot be taken back."""

    BATCH = 32  # characters gathered beyond the hold-back before a release is tried (scans per token: fewer)
    CUTS = 4  # whitespace cuts tried, latest first

    def __init__(self, guards: Guardrails, policy: Policy) -> None:
        self.guards, self.policy = guards, policy
        self.window = [s.model_copy(update={"match_type": "all"}) if isinstance(s, RegexScanner) and
                       s.match_type == "search" else s for s in policy.scanners if not s.length_limit]
        self.limits = [s for s in policy.scanners if s.length_limit]
        self.sent, self.pending = "", ""
        self.done = False  # blocked or truncated: nothing more is sent
        self.blocked = False

    def feed(self, delta: str, final: bool = False) -> str:
        if self.done:
            return ""
        raw = self.pending + delta
        cut = len(raw) if final else self._cut(raw)
        self.pending = raw[cut:]
        if not cut:
            return ""
        out = self.guards.check(raw[:cut], self.policy, self.window)
        if out.blocked:
            return self._block(out)
        ready = out.text
        if self.limits and ready:
            limited = self.guards.check(self.sent + ready, self.policy, self.limits)
            if limited.blocked:
                return self._block(limited)
            if limited.text != self.sent + ready:  # over a length limit: the answer ends here
                self.done, self.pending = True, ""
                ready = limited.text[len(self.sent):] if limited.text.startswith(self.sent) else ""
        self.sent += ready
        return ready

    def finish(self) -> str:
        return self.feed("", final=True)

    def _cut(self, raw: str) -> int:
        """How much of the unsent text may be scanned and released now (0: wait for more)."""
        hold = self.guards.holdback
        limit = len(raw) - hold
        if limit < self.BATCH:
            return 0
        try:
            whole = apply(self.policy, raw, self.window)
            if whole.blocked:
                return len(raw)  # block now: the match is not sent yet
            tried = 0
            for c in range(limit, 0, -1):
                if not raw[c - 1].isspace():
                    continue
                if apply(self.policy, raw[:c], self.window).text + apply(self.policy, raw[c:], self.window).text \
                        == whole.text:
                    return c
                tried += 1
                if tried == self.CUTS:
                    break
        except Exception:  # a failing scanner: `check` applies the fail-open / fail-closed rule
            return limit
        return limit if len(raw) > 8 * hold else 0

    def _block(self, out: Outcome) -> str:
        self.done = self.blocked = True
        self.pending = ""
        return ("\n\n" if self.sent else "") + out.text
