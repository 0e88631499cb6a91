"""fal's API key: its shape, checked once at start, and the one function that removes it.

A fal key is ``id:secret`` (in practice a UUID and a long hex string). :func:`key_problem`
says what is wrong with a key, in words that never contain the key or any part of it; the
CLI's :func:`runner.config.key_from_env` and :class:`runner.config.RunConfig` turn that into
a :class:`~runner.errors.UsageError` (exit 2) before anything is sent. A key that passes is
printable ASCII with no whitespace, so it can go into an HTTP header as it is.

:func:`redactor` is the second line of defence: every text that reaches the ledger, a log
line, an export or the report passes the function it returns, which replaces the key and
each of its parts with :data:`REDACTED`, in the forms a server or a library may echo them
(as is, percent-encoded, base64, JSON- or repr-escaped).
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable
from urllib.parse import quote

from pydantic import SecretStr

REDACTED = "[redacted]"
# The whole key is removed from any text once it has this many characters; shorter, it is
# no secret at all, and removing it would mangle ordinary words.
MIN_KEY_CHARS = 4
# Each part of id:secret is removed once it has this many characters. A part is short text
# inside ordinary text more often than the whole key is: the emulator's key id
# ``emulator`` is also the host name the tests give it, and removing it would rewrite the
# URLs the ledger follows. fal's own parts (a UUID, a long hex string) are far longer.
MIN_PART_CHARS = 10

_PRINTABLE = frozenset(chr(c) for c in range(0x21, 0x7F))  # printable ASCII, no space


def key_problem(value: str, *, name: str = "FAL_KEY") -> str | None:
    """What is wrong with a key, as one sentence naming it by ``name``; None when it is fine.

    Printable ASCII without whitespace, and ``id:secret`` (one colon, both parts non-empty)
    when it has a colon. The sentence never contains the key or any part of it.
    """
    if not value:
        return f"{name} is empty"
    if _PRINTABLE.issuperset(value):
        return _shape_problem(value, name)
    if "\n" in value or "\r" in value:
        return f"{name} contains a newline: set it to the key alone, on one line"
    if any(c.isspace() for c in value):
        return f"{name} contains whitespace: set it to the key alone, without spaces or tabs"
    return (
        f"{name} has characters outside printable ASCII (a key is letters, digits and "
        "punctuation only): was it copied with a typographic quote or a hidden character?"
    )


def _shape_problem(value: str, name: str) -> str | None:
    if ":" not in value:
        return None
    key_id, _, secret = value.partition(":")
    if not key_id or not secret or ":" in secret:
        return (
            f"{name} has a colon but is not of the form id:secret (one colon, two non-empty parts)"
        )
    return None


def secret_forms(key: str) -> tuple[str, ...]:
    """Every text :func:`redactor` removes for ``key``, longest first.

    The key and each part of ``id:secret`` long enough to mean something (see
    :data:`MIN_KEY_CHARS`, :data:`MIN_PART_CHARS`), each as it is, percent-encoded, JSON-
    and repr-escaped, and base64-encoded (standard and URL-safe, up to its last whole
    3-byte group, so the key is found at the start of a longer encoded text too).
    """
    pieces = [key] if len(key) >= MIN_KEY_CHARS else []
    key_id, colon, secret = key.partition(":")
    if colon:
        pieces += [part for part in (key_id, secret) if len(part) >= MIN_PART_CHARS]
    forms: set[str] = set()
    for piece in pieces:
        whole = piece.encode()[: len(piece.encode()) // 3 * 3]
        forms.update(
            {
                piece,
                quote(piece, safe=""),
                json.dumps(piece)[1:-1],
                repr(piece)[1:-1],
                base64.b64encode(whole).decode(),
                base64.urlsafe_b64encode(whole).decode(),
            }
        )
    forms.discard("")
    return tuple(sorted(forms, key=lambda form: (-len(form), form)))


def redactor(key: SecretStr | str | None) -> Callable[[str], str]:
    """The one redaction function of a run: text in, text without ``key`` (any form) out.

    With no key the function returns its text unchanged. The forms are worked out once
    here, so a call costs one substring search per form when nothing is found.
    """
    secret = key.get_secret_value() if isinstance(key, SecretStr) else key
    forms = secret_forms(secret) if secret else ()

    def redact(text: str) -> str:
        for form in forms:
            if form in text:
                text = text.replace(form, REDACTED)
        return text

    return redact


def redact(text: str, key: SecretStr | str | None) -> str:
    """``text`` without ``key`` or its parts: :func:`redactor` for a single use."""
    return redactor(key)(text)


def fingerprint(key: SecretStr | str) -> str:
    """A short, stable name for a key that reveals nothing of it: what run.json records
    and what a gate directory is named after (``fp-`` and 16 hex digits of a SHA-256)."""
    secret = key.get_secret_value() if isinstance(key, SecretStr) else key
    digest = hashlib.sha256(b"runner key fingerprint\0" + secret.encode()).hexdigest()
    return "fp-" + digest[:16]
