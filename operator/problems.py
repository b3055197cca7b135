"""What validation reports: a FieldError per problem (upstream's field path and message), and
ValidationFailed carrying them all; the DNS names Kubernetes accepts."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .api import Resource

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


@dataclass(frozen=True)
class FieldError:
    field: str
    message: str
    warning: bool = False  # admitted, but the user is told (AdmissionReview `warnings`)

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


class ValidationFailed(ValueError):
    def __init__(self, resource: Resource, errors: list[FieldError]) -> None:
        self.errors = errors
        lines = "\n  ".join(str(e) for e in errors)
        super().__init__(f"{resource.kind} {resource.namespace}/{resource.name} is invalid:\n  {lines}")
