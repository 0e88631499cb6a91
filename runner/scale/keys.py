"""``--keys-file``: several fal keys, each with its own limits, and which shard uses which.

The file holds one key per line; after the key, optional ``name=value`` settings separated
by spaces; blank lines and lines starting with ``#`` are ignored. A line written for a shell
or a .env file (``FAL_KEY=...``, ``export ...``, a quoted key) is refused, naming the line::

    # key                                       settings
    0f1e...:9a8b...                             concurrency=8
    5d6c...:7e8f...                             concurrency=40 rate=20

``concurrency`` is the key's slots (default ``--concurrency``), ``rate`` its submits per
second (default ``--rate``). Each key is checked like ``FAL_KEY``
(:func:`runner.fal.key.key_problem`); an error names the file and line, never the key.
A key is known everywhere else by its fingerprint (:func:`runner.fal.key.fingerprint`).

Shard ``K`` uses key ``K mod len(keys)``, unless its ledger says another key submitted its
jobs: then it keeps that key, so re-attach and cancel ask with the key that submitted. That
key missing is refused only while some of the shard's jobs are in flight under it.

A key never travels to another machine (Ray's task arguments pass through its object store,
which can spill to disk): what travels is a :class:`KeyRef`, the fingerprint and limits, and
the worker finds the key itself in its own ``FAL_KEY`` or keys file (:func:`find_key`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import SecretStr

from runner.config import key_from_env
from runner.errors import UsageError
from runner.fal.key import fingerprint, key_problem

_SETTINGS = ("concurrency", "rate")


@dataclass(frozen=True, slots=True)
class KeySpec:
    """One key and its limits. Its repr shows the fingerprint, never the key.

    ``source`` is where it was read (``keys.txt line 3``), None for ``FAL_KEY``.
    """

    key: SecretStr
    fingerprint: str
    concurrency: int | None = None
    rate_per_s: float | None = None
    source: str | None = None

    @classmethod
    def of(
        cls,
        key: SecretStr,
        *,
        concurrency: int | None = None,
        rate_per_s: float | None = None,
        source: str | None = None,
    ) -> KeySpec:
        return cls(key, fingerprint(key), concurrency, rate_per_s, source)

    @property
    def name(self) -> str:
        """How a message names this key: where it was read and its fingerprint, never it."""
        if self.source is None:
            return "FAL_KEY"
        return f"the key on {self.source}, {self.fingerprint}"

    def __repr__(self) -> str:
        return (
            f"KeySpec({self.fingerprint}, concurrency={self.concurrency}, "
            f"rate_per_s={self.rate_per_s})"
        )

    def ref(self) -> KeyRef:
        """This key's fingerprint and limits, without the key: what may cross machines."""
        return KeyRef(self.fingerprint, self.concurrency, self.rate_per_s)


@dataclass(frozen=True, slots=True)
class KeyRef:
    """A key known by its fingerprint and limits only; :func:`find_key` gives the key back."""

    fingerprint: str
    concurrency: int | None = None
    rate_per_s: float | None = None


def parse_keys(text: str, *, source: str = "keys file") -> list[KeySpec]:
    """The keys of a keys file's text, in order. Raises UsageError naming the line only."""
    specs: list[KeySpec] = []
    seen: set[str] = set()
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, *settings = line.split()
        where = f"{source} line {number}"
        problem = _not_a_bare_key(key, where) or key_problem(key, name=f"the key on {where}")
        if problem:
            raise UsageError(problem)
        values = _settings(settings, where)
        spec = KeySpec.of(
            SecretStr(key),
            concurrency=int(values["concurrency"]) if "concurrency" in values else None,
            rate_per_s=float(values["rate"]) if "rate" in values else None,
            source=where,
        )
        if spec.fingerprint in seen:
            raise UsageError(f"{where}: the same key is listed twice")
        seen.add(spec.fingerprint)
        specs.append(spec)
    if not specs:
        raise UsageError(f"{source} holds no key")
    return specs


def _not_a_bare_key(first: str, where: str) -> str | None:
    """A line written for a shell or a .env file (``FAL_KEY=id:secret``, ``export ...``, a
    quoted key) is refused rather than guessed at: which part is the key is the user's to
    say, and a wrong guess is a key sent where it should not be. Never echoes the line."""
    if first == "export" or "=" in first:
        return (
            f"{where} looks like a variable assignment (NAME=...): write the key alone at the "
            "start of the line (what follows FAL_KEY=, without quotes), then any settings"
        )
    if first[0] in "\"'" or first[-1] in "\"'":
        return f"{where}: the key is in quotes: write it without them"
    return None


def _settings(items: Sequence[str], where: str) -> dict[str, str]:
    values: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in _SETTINGS:
            # The item may be a second key pasted on the line: never echo it.
            raise UsageError(
                f"{where}: after the key, expected settings such as concurrency=8 or rate=10"
            )
        try:
            number = int(value) if name == "concurrency" else float(value)
        except ValueError:
            raise UsageError(f"{where}: {name} must be a number") from None
        if not number > 0:  # NaN too
            raise UsageError(f"{where}: {name} must be positive")
        values[name] = value
    return values


def load_keys(path: Path) -> list[KeySpec]:
    try:
        text = path.read_text(encoding="utf-8-sig")  # an editor's byte-order mark is not the key's
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read --keys-file {path}: {exc.__class__.__name__}") from None
    return parse_keys(text, source=str(path))


def key_for_shard(
    shard: int,
    keys: Sequence[KeySpec],
    recorded: Mapping[int, str | None],
    *,
    in_flight: Callable[[int], int] | None = None,
    key_changed: bool = False,
) -> KeySpec:
    """The key shard ``shard`` runs with: the one its ledger recorded, else by position.

    A recorded key that is not among ``keys`` is refused while ``in_flight(shard)`` counts
    jobs left in flight under it (to re-attach, settle from its history, or cancel: only that
    key can); with none (or a count of 0), the shard takes its key by position. Without
    ``in_flight``, the shard is taken to have some. ``key_changed`` (``--key-changed``):
    the recorded key was rotated within the same account, so the key by position serves.
    """
    was = recorded.get(shard)
    if was is None:
        return keys[shard % len(keys)]
    for spec in keys:
        if spec.fingerprint == was:
            return spec
    if key_changed:
        return keys[shard % len(keys)]
    left = 1 if in_flight is None else in_flight(shard)
    if left == 0:  # nothing of that key's to re-attach or cancel: any key will do
        return keys[shard % len(keys)]
    held, rotated = "", ""
    if in_flight is not None:  # a run: --key-changed says the account is the same
        held = f" and {left} of its jobs are in flight under it"
        rotated = ", or pass --key-changed if the keys given are of the same account"
    raise UsageError(
        f"shard {shard} was submitted with key {was}, which is not among the keys given{held}; "
        "add it back (its in-flight jobs can only be re-attached, settled or cancelled with it)"
        f"{rotated}"
    )


def find_key(ref: KeyRef, *, environ: Mapping[str, str], keys_file: Path | None) -> KeySpec:
    """The key of fingerprint ``ref.fingerprint`` on this machine, with ``ref``'s limits.

    Looks at ``FAL_KEY`` in ``environ``, then at the keys of ``keys_file`` (when given).
    None matching is a UsageError naming the fingerprint and what was looked at, never a key.
    """
    looked: list[str] = []
    candidates: list[KeySpec] = []
    env_key = key_from_env(environ)
    looked.append("FAL_KEY (not set)" if env_key is None else "FAL_KEY (another key)")
    if env_key is not None:
        candidates.append(KeySpec.of(env_key))
    if keys_file is not None:
        try:
            listed = load_keys(keys_file)
        except UsageError as exc:
            looked.append(f"--keys-file ({exc})")
        else:
            candidates.extend(listed)
            looked.append(f"--keys-file {keys_file} ({len(listed)} keys, none of them it)")
    for spec in candidates:
        if spec.fingerprint == ref.fingerprint:
            return KeySpec(spec.key, ref.fingerprint, ref.concurrency, ref.rate_per_s, spec.source)
    raise UsageError(
        f"this machine has no key with fingerprint {ref.fingerprint} (looked at "
        f"{'; '.join(looked)}): keys never travel with the work, so set FAL_KEY or "
        "--keys-file (the same path) to that key on every node"
    )
