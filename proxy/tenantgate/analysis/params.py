"""Bind-time matching of a ``$n`` parameter value against the tenant id.

Owns :func:`tenant_param_matches`.  Rules (anything else is ``False``; NULL is
``False``):

* **Text format**: the value must be valid UTF-8 and equal the tenant id
  exactly, for type oids 0 (unspecified), 25 text, 1043 varchar and 705
  unknown.  For 2950 uuid the canonical UUIDs are compared; for 21/23/20
  (int2/int4/int8) the decimal integers (surrounding spaces and a sign allowed,
  as the server's input function does).  Other oids (``name``, ``bpchar``, ...)
  are refused: the server could truncate or pad the value.
* **Binary format**: 25/1043 raw UTF-8 bytes; 2950 16 bytes -> canonical UUID;
  21/23/20 big-endian signed 2/4/8 bytes -> decimal.
* **Binary with oid 0** (the server infers the type from context): we list the
  encodings the bytes are valid in -- text (valid UTF-8 without NUL), int2/4/8
  (by length), uuid (16 bytes) -- and accept only if *exactly one* is valid and
  it equals the tenant.  If several are possible we cannot know which one the
  server will use, so we refuse.
"""

from __future__ import annotations

import uuid
from typing import Final

_TEXT_OIDS: Final = frozenset({0, 25, 1043, 705})
_INT_SIZES: Final = {21: 2, 23: 4, 20: 8}
UUID_OID: Final = 2950


def _canonical_uuid(text: str) -> str | None:
    try:
        return str(uuid.UUID(text.strip()))
    except ValueError:
        return None


def _decimal(text: str) -> str | None:
    stripped = text.strip()
    body = stripped[1:] if stripped[:1] in "+-" else stripped
    if not body or not body.isdigit() or not body.isascii():
        return None
    return str(int(stripped))


def matches_as_bytes(binary: bool, type_oid: int) -> bool:
    """Whether :func:`tenant_param_matches` of a value in this format and of this type
    is exactly ``value == tenant.encode()`` (text format, a text type: the text is
    compared as is, and UTF-8 decodes one way only)."""
    return not binary and type_oid in _TEXT_OIDS


def tenant_param_matches(value: bytes | None, binary: bool, type_oid: int, tenant: str) -> bool:
    """True when a Bind parameter value is this tenant's id (see module doc)."""
    if value is None:
        return False
    if not binary:
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            return False
        if type_oid in _TEXT_OIDS:
            return text == tenant
        if type_oid == UUID_OID:
            mine = _canonical_uuid(tenant)
            return mine is not None and _canonical_uuid(text) == mine
        if type_oid in _INT_SIZES:
            mine = _decimal(tenant)
            return mine is not None and _decimal(text) == mine
        return False
    if type_oid == 0:
        readings = [(oid, _binary_as(value, oid)) for oid in (25, 21, 23, 20, UUID_OID)]
        valid = [(oid, reading) for oid, reading in readings if reading is not None]
        return len(valid) == 1 and valid[0][1] == tenant_form(valid[0][0], tenant)
    return _binary_as(value, type_oid) == tenant_form(type_oid, tenant)


def tenant_form(type_oid: int, tenant: str) -> str | None:
    """The tenant id as the server would hold it in a column of ``type_oid``."""
    if type_oid in (25, 1043):
        return tenant
    if type_oid == UUID_OID:
        return _canonical_uuid(tenant)
    if type_oid in _INT_SIZES:
        return _decimal(tenant)
    return None


def _binary_as(value: bytes, type_oid: int) -> str | None:
    if type_oid in (25, 1043):
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            return None
        return None if "\x00" in text else text
    if type_oid == UUID_OID:
        return str(uuid.UUID(bytes=value)) if len(value) == 16 else None
    size = _INT_SIZES.get(type_oid)
    if size is not None and len(value) == size:
        return str(int.from_bytes(value, "big", signed=True))
    return None
