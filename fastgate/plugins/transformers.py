"""Config shapes shared by request-transformer and response-transformer (behavior.md 7.1)."""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta

from fastgate._core import plugin_core as core


def check_template(value: str) -> str | None:
    try:
        core.parse_template(value)
    except ValueError as exc:
        return str(exc)
    return None


def check_name_value(value: str) -> str | None:
    name, colon, template = value.partition(":")
    if not colon or not name:
        return f"invalid value: {value} (expected 'name:value')"
    return check_template(template)


def check_rename(value: str) -> str | None:
    old, colon, new = value.partition(":")
    return None if colon and old and new else f"invalid value: {value} (expected 'old:new')"


Names = list[str]
NameValues = list[Annotated[str, Meta(extra={"check": check_name_value})]]
Renames = list[Annotated[str, Meta(extra={"check": check_rename})]]
Template = Annotated[str, Meta(extra={"check": check_template})]
