"""Training data: files (JSON Lines, JSON, CSV, Parquet) from folders, paths or http(s) URLs, checked
row by row before training, then tokenised with the model's chat template and the prompt masked.

Three row shapes, told apart by their columns (renamed with DatasetConfig):
- conversational `{"messages": [{"role": ..., "content": ...}, ...]}`: loss on assistant turns;
- instruction `{"prompt": ..., "completion": ...}`: a user turn and an assistant turn;
- plain `{"text": ...}`: loss on every token.
"""

from __future__ import annotations

import csv
import ipaddress
import json
import os
import random
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urljoin, urlparse

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .config import ConfigError, DatasetArgs

EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
IGNORE_INDEX = -100


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str = Field(min_length=1)


class Conversation(BaseModel):
    messages: list[Message] = Field(min_length=1)


class Instruction(BaseModel):
    prompt: str = Field(min_length=1)
    completion: str = Field(min_length=1)


class Text(BaseModel):
    text: str = Field(min_length=1)


@dataclass
class Row:
    source: str  # "file:row" for messages
    messages: list[dict[str, str]] | None = None
    text: str | None = None


# -- fetching -------------------------------------------------------------------------------------


def _refuse_private(url: str) -> None:
    host = urlparse(url).hostname
    if not host:
        raise ConfigError(f"{url}: no host name")
    try:
        addrs = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror as e:
        raise ConfigError(f"{url}: cannot resolve {host}: {e.strerror}") from None
    for addr in addrs:
        ip = ipaddress.ip_address(addr.split("%")[0])
        if ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved or ip.is_multicast \
                or ip.is_unspecified:
            raise ConfigError(f"{url}: {host} resolves to {ip}, a private, loopback or link-local address; "
                              "data URLs must be public (--allow-private-urls allows them)")


def download(url: str, dest_dir: Path, *, max_bytes: int, allow_private: bool, retries: int = 3,
             progress: bool = True) -> Path:
    """Download `url` into dest_dir with retries, a progress bar and a size limit."""
    import httpx
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    name = Path(urlparse(url).path).name or "data"
    dest = dest_dir / name
    last: Exception | None = None
    for attempt in range(retries):
        try:
            current = url
            for _ in range(6):  # redirects, each hop checked
                if urlparse(current).scheme not in ("http", "https"):
                    raise ConfigError(f"{url}: only http(s) URLs are downloaded, not {current}")
                if not allow_private:
                    _refuse_private(current)
                with httpx.stream("GET", current, timeout=30, follow_redirects=False) as r:
                    if r.is_redirect:
                        current = urljoin(current, r.headers["location"])
                        continue
                    if r.status_code >= 500 or r.status_code == 429:
                        raise httpx.HTTPStatusError(f"HTTP {r.status_code}", request=r.request, response=r)
                    if r.status_code != 200:
                        raise ConfigError(f"{url}: HTTP {r.status_code}")
                    size = int(r.headers.get("content-length") or 0)
                    if size > max_bytes:
                        raise ConfigError(f"{url}: {size} bytes is over the download limit of {max_bytes} bytes")
                    done = 0
                    with open(dest, "wb") as f, Progress(TextColumn("{task.description}"), BarColumn(),
                                                          DownloadColumn(), TransferSpeedColumn(),
                                                          disable=not progress, transient=True) as bar:
                        task = bar.add_task(f"download {name}", total=size or None)
                        for chunk in r.iter_bytes(1 << 20):
                            done += len(chunk)
                            if done > max_bytes:
                                raise ConfigError(f"{url}: more than the download limit of {max_bytes} bytes")
                            f.write(chunk)
                            bar.update(task, advance=len(chunk))
                    return dest
            raise ConfigError(f"{url}: too many redirects")
        except ConfigError:
            raise
        except httpx.HTTPError as e:
            last = e
            time.sleep(min(2 ** attempt, 10))
    raise ConfigError(f"{url}: download failed after {retries} tries: {last}")


def data_files(sources: list[str], cfg: DatasetArgs, *, max_bytes: int, allow_private: bool,
               progress: bool = True) -> list[Path]:
    """The data files named by --data (files, folders, URLs) and DatasetConfig.dataset_path."""
    files: list[Path] = []
    tmp: Path | None = None
    for src in sources:
        if src.startswith(("http://", "https://")):
            tmp = tmp or Path(tempfile.mkdtemp(prefix="kaito-tune-data-"))
            files.append(download(src, tmp, max_bytes=max_bytes, allow_private=allow_private, progress=progress))
            continue
        path = Path(src).expanduser()
        if cfg.dataset_path:
            inner = Path(cfg.dataset_path.lstrip("/").removeprefix("data/")) if path.is_dir() else None
            path = path / inner if inner else path
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS)
            if not found:
                raise ConfigError(f"data folder {path} holds no {', '.join(EXTENSIONS)} files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise ConfigError(f"data {src}: no such file or folder")
    return files


# -- reading and checking -------------------------------------------------------------------------


def _records(path: Path, ext: str | None) -> list[tuple[int, Any]]:
    """(row number, record) pairs; row numbers are 1-based lines for JSON Lines and CSV (after the header)."""
    kind = ext or EXTENSIONS.get(path.suffix.lower())
    if kind is None:
        raise ConfigError(f"{path}: unknown data format; use .jsonl, .json, .csv or .parquet "
                          "(or set DatasetConfig.dataset_extension)")
    try:
        if kind == "jsonl":
            out = []
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            out.append((n, json.loads(line)))
                        except json.JSONDecodeError as e:
                            raise ConfigError(f"{path}:{n}: not valid JSON: {e.msg}") from None
            return out
        if kind == "json":
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}: not valid JSON (line {e.lineno}): {e.msg}") from None
            if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
                data = next(iter(data.values()))  # {"data": [...]}
            if not isinstance(data, list):
                raise ConfigError(f"{path}: a JSON data file holds a list of rows")
            return list(enumerate(data, 1))
        if kind == "csv":
            with open(path, encoding="utf-8", newline="") as f:
                return list(enumerate(csv.DictReader(f), 1))
        import pyarrow.parquet as pq

        return list(enumerate(pq.read_table(path).to_pylist(), 1))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None
    except Exception as e:  # pyarrow's errors
        if type(e).__module__.startswith("pyarrow"):
            raise ConfigError(f"{path}: not a readable Parquet file: {e}") from None
        raise


def _shape(record: dict, cfg: DatasetArgs) -> Literal["messages", "instruction", "text"]:
    if cfg.messages_column or (not cfg.context_column and "messages" in record):
        return "messages"
    if cfg.context_column or "prompt" in record:
        return "instruction"
    return "text"


def _explain(err: ValidationError, names: dict[str, str]) -> str:
    first = err.errors()[0]
    loc = [names.get(str(p), str(p)) for p in first["loc"]]
    where = "".join(f"[{p}]" if p.isdigit() else (f".{p}" if i else p) for i, p in enumerate(loc))
    msg = first["msg"]
    if first["type"] == "missing":
        msg = "missing"
    elif first["type"] == "literal_error":
        msg = f"{msg}, got {first['input']!r}"
    return f"{where}: {msg}" if where else msg


def _pick(record: dict, **columns: str) -> dict:
    """The record's columns under their standard names (absent ones stay absent: reported as missing)."""
    return {name: record[col] for name, col in columns.items() if col in record}


def read_rows(files: list[Path], cfg: DatasetArgs) -> list[Row]:
    """Every row of every file, checked; the first bad row is reported by file, row and problem."""
    rows: list[Row] = []
    msg_col = cfg.messages_column or "messages"
    ctx_col, resp_col = cfg.context_column or "prompt", cfg.response_column
    for path in files:
        shape = None  # each file has one shape, told by its first row
        for n, rec in _records(path, cfg.dataset_extension):
            where = f"{path}:{n}" if path.suffix.lower() in (".jsonl", ".ndjson") else f"{path} row {n}"
            if not isinstance(rec, dict):
                raise ConfigError(f"{where}: a row must be an object with named columns, not {type(rec).__name__}")
            shape = shape or _shape(rec, cfg)
            try:
                if shape == "messages":
                    value = rec.get(msg_col)
                    if isinstance(value, str):  # CSV cells hold JSON text
                        try:
                            value = json.loads(value)
                        except json.JSONDecodeError:
                            raise ConfigError(f"{where}: column {msg_col!r} is not a JSON list of messages") from None
                    conv = Conversation.model_validate({"messages": value}, context=None)
                    messages = [m.model_dump() for m in conv.messages]
                    if not any(m["role"] == "assistant" for m in messages):
                        raise ConfigError(f"{where}: no assistant message, so nothing to learn")
                    rows.append(Row(where, messages=messages))
                elif shape == "instruction":
                    resp = resp_col or "completion"
                    ins = Instruction.model_validate(_pick(rec, prompt=ctx_col, completion=resp))
                    rows.append(Row(where, messages=[{"role": "user", "content": ins.prompt},
                                                     {"role": "assistant", "content": ins.completion}]))
                else:
                    rows.append(Row(where, text=Text.model_validate(_pick(rec, text=resp_col or "text")).text))
            except ValidationError as e:
                names = {"messages": msg_col, "prompt": ctx_col, "completion": resp_col or "completion",
                         "text": resp_col or "text"}
                cols = ", ".join(map(repr, rec)) or "none"
                raise ConfigError(f"{where}: {_explain(e, names)} (a {shape} row; its columns: {cols})") from None
    if not rows:
        raise ConfigError(f"no rows in {', '.join(map(str, files))}")
    return rows


def split(rows: list[Row], cfg: DatasetArgs) -> tuple[list[Row], list[Row]]:
    rows = list(rows)
    if cfg.shuffle_dataset:
        random.Random(cfg.shuffle_seed).shuffle(rows)
    if cfg.train_test_split >= 1 or len(rows) < 2:
        return rows, []
    n_train = min(len(rows) - 1, max(1, round(len(rows) * cfg.train_test_split)))
    return rows[:n_train], rows[n_train:]


# -- tokenising ------------------------------------------------------------------------------------


def tokenize(row: Row, tokenizer, max_len: int, completion_only: bool) -> dict[str, list[int]]:
    """input_ids and labels; labels are IGNORE_INDEX outside assistant turns (when completion_only).
    Assistant spans come from rendering the chat template turn by turn and mapping characters to
    tokens, so they hold exactly what the template writes for the answer, end-of-turn token included."""
    if row.text is not None:
        ids = tokenizer(row.text, add_special_tokens=True)["input_ids"]
        if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids = ids + [tokenizer.eos_token_id]
        ids = ids[:max_len]
        return {"input_ids": ids, "labels": list(ids)}
    msgs = row.messages
    full = tokenizer.apply_chat_template(msgs, tokenize=False)
    spans = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        head = tokenizer.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True) if i else ""
        upto = tokenizer.apply_chat_template(msgs[: i + 1], tokenize=False)
        if not (full.startswith(upto) and upto.startswith(head)):
            raise ConfigError(f"{row.source}: the chat template renders earlier turns differently in a longer "
                              "conversation, so the answer tokens cannot be told apart; split the conversation")
        spans.append((len(head), len(upto)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"][:max_len]
    if not completion_only:
        return {"input_ids": ids, "labels": list(ids)}
    labels = [tok if any(s <= a < e for s, e in spans) else IGNORE_INDEX
              for tok, (a, _b) in zip(ids, enc["offset_mapping"])]
    if all(x == IGNORE_INDEX for x in labels):
        raise ConfigError(f"{row.source}: no answer token is left within max_seq_length {max_len} "
                          "(raise DatasetConfig.max_seq_length or shorten the row)")
    return {"input_ids": ids, "labels": labels}


def check_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("the tokenizer has no chat template, which conversational and instruction rows need: "
                          "set ModelConfig.chat_template (a file or the template text)")
    probe = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    head = tokenizer.apply_chat_template(probe[:1], tokenize=False, add_generation_prompt=True)
    if not tokenizer.apply_chat_template(probe, tokenize=False).startswith(head):
        raise ConfigError("the chat template does not render a conversation as an extension of its prompt, "
                          "so answer tokens cannot be told apart; use another ModelConfig.chat_template")
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError("a fast tokenizer (tokenizer.json) is needed to map answer characters to tokens")


def max_download_bytes() -> int:
    return int(float(os.environ.get("KAITO_TUNE_MAX_DOWNLOAD_MB", "2048")) * 1024 * 1024)
