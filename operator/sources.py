"""Validation of what a resource points at: adapters, tuning data sources and destinations, volumes,
image references and URLs, with upstream KAITO's rules and messages."""

from __future__ import annotations

import ipaddress
import re
import urllib.parse

from .api import AdapterSpec, DataDestination, DataSource
from .problems import DNS1123_SUBDOMAIN, FieldError

MAX_ADAPTERS = 10
METADATA_HOSTS = {"metadata.google.internal", "metadata.google", "instance-data.ec2.internal", "metadata.azure.com"}
IMAGE_REF = re.compile(r"^(?:[a-zA-Z0-9.-]+(?::[0-9]+)?/)?[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*"
                       r"(?::[\w][\w.-]{0,127})?(?:@sha256:[a-f0-9]{64})?$")


def adapters(adapters: list[AdapterSpec]) -> list[FieldError]:
    errs: list[FieldError] = []
    if len(adapters) > MAX_ADAPTERS:
        errs.append(FieldError("inference.adapters", f"Number of Adapters exceeds the maximum limit, maximum of "
                                                     f"{MAX_ADAPTERS} allowed"))
    seen: set[str] = set()
    for i, a in enumerate(adapters):
        where = f"inference.adapters[{i}]"
        src = a.source
        if src is None:
            errs.append(FieldError(where, "missing field: source"))
            continue
        if not src.name:
            errs.append(FieldError(f"{where}.source.name", "Name of Adapter field must be specified"))
        elif not DNS1123_SUBDOMAIN.match(src.name) or len(src.name) > 253:
            errs.append(FieldError(f"{where}.source.name", f"{src.name!r} must be a DNS-1123 subdomain (lowercase "
                                                           "letters, digits, '-' and '.')"))
        elif src.name in seen:
            errs.append(FieldError(f"{where}.source.name", f"Duplicate adapter source name found: {src.name}"))
        seen.add(src.name or "")
        if src.urls:
            errs.append(FieldError(f"{where}.source.urls", "URLs are not supported as adapter source"))
        if not src.image and src.volume_source is None:
            errs.append(FieldError(f"{where}.source", "Either Image or Volume must be specified for adapter source"))
        if src.image and src.volume_source is not None:
            errs.append(FieldError(f"{where}.source", "Image and Volume cannot both be specified for adapter source"))
        errs += volume(src.volume_source, f"{where}.source.volumeSource")
        strength = a.strength if a.strength is not None else "1.0"
        try:
            value = float(strength)
        except ValueError:
            errs.append(FieldError(f"{where}.strength", f"Invalid strength value for Adapter '{src.name}': "
                                                        f"{strength!r} is not a number"))
            continue
        if not 0 <= value <= 1:
            errs.append(FieldError(f"{where}.strength", f"Strength value for Adapter '{src.name}' must be between 0 "
                                                        "and 1"))
    return errs


def volume(volume: dict | None, where: str) -> list[FieldError]:
    if volume is None:
        return []
    from .schemas import schema_errors

    return [FieldError(where, m) for m in schema_errors(volume, "VolumeSource")]


def data_source(src: DataSource, where: str) -> list[FieldError]:
    errs = []
    given = sum([bool(src.urls), bool(src.image), src.volume_source is not None])
    if given != 1:
        errs.append(FieldError(where, "Exactly one of URLs, Volume, or Image must be specified"))
    for url in src.urls or []:
        problem = url_problem(url)
        if problem:
            errs.append(FieldError(f"{where}.urls", f"{url}: {problem}"))
    if src.image:
        errs += image(src.image, f"{where}.image")
    errs += volume(src.volume_source, f"{where}.volumeSource")
    return errs


def data_destination(dst: DataDestination, where: str) -> list[FieldError]:
    errs = []
    if bool(dst.image) + (dst.volume_source is not None) != 1:
        errs.append(FieldError(where, "Exactly one of Volume or Image must be specified"))
    if dst.image:
        errs += image(dst.image, f"{where}.image")
        if not dst.image_push_secret:
            errs.append(FieldError(f"{where}.imagePushSecret", "Must specify imagePushSecret with destination image"))
    errs += volume(dst.volume_source, f"{where}.volumeSource")
    return errs


def image(ref: str, where: str) -> list[FieldError]:
    if not IMAGE_REF.match(ref):
        return [FieldError(where, f"Unable to parse image reference {ref!r}")]
    return []


def url_problem(url: str) -> str | None:
    """Why a data-source URL is refused (upstream's rules), or None. Only http(s), and never a
    loopback, private, link-local or cloud-metadata address."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme.lower() not in ("http", "https"):
        return "data source URL must use HTTP or HTTPS"
    host = (parsed.hostname or "").lower()
    if not host:
        return "invalid data source URL"
    if host == "localhost" or host.endswith(".localhost") or host in METADATA_HOSTS:
        return "data source URL must not target a local or metadata endpoint"
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return None
    if ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_unspecified or ip.is_multicast:
        return "data source URL must not target a loopback, private, or link-local address"
    return None


def http_url(url: str, where: str) -> list[FieldError]:
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return [FieldError(where, f"URL input error: {url!r} is not an http(s) URL")]
    return []
