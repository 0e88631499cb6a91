"""The runner's one exception tree.

Every exception the package raises on purpose derives from :class:`RunnerError`.
Lower-level errors (httpx, pyarrow, pydantic, OS) are translated at exactly one
boundary each, with ``raise ... from exc``.

    RunnerError
    ├── UsageError              bad flags or configuration                  exit 2
    │   └── UnknownEndpointError  endpoint id not in the catalog             exit 2
    ├── ManifestError           whole-file problem: unreadable, empty,      exit 2
    │                           no endpoint anywhere, strict mode refusal
    ├── RowError                one manifest row is bad (file, line,        recorded,
    │                           column, reason); never stops a run          not raised
    ├── LedgerError             the run directory cannot be used            exit 4
    │   ├── LedgerLockedError     another writer holds the lock
    │   └── LedgerCorruptError    a part or journal cannot be read
    ├── FalError                talking to fal (or the emulator)
    │   ├── AuthError             401/403: the key is wrong                  exit 2
    │   ├── TransportError        no HTTP answer (connect, read, reset)
    │   ├── HTTPStatusError       an HTTP answer with an unexpected status
    │   ├── ProtocolError         an answer that breaks the queue protocol
    │   └── PlatformUnavailableError
    │                             the Platform API refuses this key          not fatal: no
    │                             (401/403/404) or fails past retries        history or prices

A per-job failure is a *record* in the ledger, not an exception escaping a worker:
only the fatal errors above stop a run. A run that stops at the budget (exit 3) or on
Ctrl-C / SIGTERM (exit 130) ends normally, with its report: those are outcomes of the
run, not errors. No message here ever contains the key.
"""

from __future__ import annotations

from dataclasses import dataclass

EXIT_OK = 0
EXIT_JOBS_FAILED = 1
EXIT_USAGE = 2
EXIT_BUDGET = 3
EXIT_LEDGER = 4
EXIT_INTERRUPTED = 130


class RunnerError(Exception):
    """Root of every error the runner raises on purpose."""

    exit_code: int = EXIT_USAGE


class UsageError(RunnerError):
    """A flag, option or configuration value is wrong."""


class UnknownEndpointError(UsageError):
    """An endpoint id that the catalog does not know and the user did not allow."""

    def __init__(self, endpoint: str, known: list[str]) -> None:
        self.endpoint = endpoint
        self.known = known
        super().__init__(
            f"unknown endpoint {endpoint!r}; known endpoints: {', '.join(known)} "
            f"(use --allow-endpoint {endpoint} to send it untyped)"
        )


class ManifestError(RunnerError):
    """The manifest as a whole cannot be used (one clear message, no traceback)."""


@dataclass(frozen=True, slots=True)
class RowProblem:
    """Where and why a row is bad: ``demo.csv:14: guidance_scale=40 is above ...``."""

    file: str
    line: int
    column: str | None
    message: str
    row_id: str | None = None

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


class RowError(RunnerError):
    """A single manifest row is bad. Carries one or more :class:`RowProblem`."""

    def __init__(self, problems: list[RowProblem]) -> None:
        self.problems = problems
        super().__init__("; ".join(str(p) for p in problems))


class LedgerError(RunnerError):
    """The run directory or its ledger cannot be used."""

    exit_code = EXIT_LEDGER


class LedgerLockedError(LedgerError):
    """Another process is writing to this run directory."""


class LedgerCorruptError(LedgerError):
    """A ledger file cannot be read back."""


class FalError(RunnerError):
    """A call to fal's queue (or the emulator) did not go as the protocol says."""


class AuthError(FalError):
    """The service refused the key (401/403). The key itself is never included.

    The message ends by saying which key to check: ``FAL_KEY`` unless :meth:`naming` names
    another (a keys file's line and the key's fingerprint).
    """

    def __init__(self, message: str, *, key_name: str = "FAL_KEY") -> None:
        # args holds the refusal alone and the name is an attribute: a pickled copy (a Ray
        # worker's error) comes back the same, not with "(check ...)" said twice.
        super().__init__(message)
        self.refusal = message
        self.key_name = key_name

    def __str__(self) -> str:
        return f"{self.refusal} (check {self.key_name})"

    def naming(self, key_name: str) -> AuthError:
        """The same refusal, saying to check ``key_name`` (never the key itself)."""
        return AuthError(self.refusal, key_name=key_name)


class TransportError(FalError):
    """No HTTP answer: connection refused, reset, or timed out.

    ``sent`` says whether the request body may have reached the server, which
    decides whether a submit is safe to retry.
    """

    def __init__(self, message: str, *, sent: bool) -> None:
        self.sent = sent
        super().__init__(message)


class HTTPStatusError(FalError):
    """An HTTP answer with a status the caller did not expect."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        body: str = "",
        request_id: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        self.status_code = status_code
        self.body = body
        self.request_id = request_id
        self.retry_after_s = retry_after_s
        super().__init__(message)


class ProtocolError(FalError):
    """A response that does not follow fal's queue protocol."""


class PlatformUnavailableError(FalError):
    """fal's Platform API cannot be read with this key: history or prices unavailable.

    Raised for 401/403/404 (the API is unavailable to some keys or plans) and for failures
    that outlast the retry policy. Not an :class:`AuthError`: a key the queue accepts but the
    Platform API refuses means "fall back and say so", not "stop the run". ``path`` is the
    URL path called and ``status_code`` the HTTP status (None when no answer came).
    """

    def __init__(self, message: str, *, path: str, status_code: int | None = None) -> None:
        self.path = path
        self.status_code = status_code
        super().__init__(message)
