"""A shard's messages on its run's live stream, prefixed with the shard.

Each shard's engine writes its output (what its :class:`runner.execution.progress.Progress`
prints: messages, and with ``--log-format json`` a ``failure`` event per job that did not
complete) to a :class:`ShardLines` stream. It forwards messages and failures, prefixed
``shard K:``, to a :class:`Relay` (the sharded run's own progress view, or for ``runner ray``
a list the worker sends to the driver) and drops the shard's own progress lines: the run
shows one progress view over all shards.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable
from dataclasses import dataclass

# A Progress log line of counts ("12/40 done (...") rather than a message.
_COUNTS = re.compile(r"\d+/(\d+|\?) done \(")
_TEXT_PREFIX = "runner: "

Failure = Callable[[str, str | None, str], None]  # reason, row id, message


@dataclass(frozen=True, slots=True)
class Relay:
    """Where a shard's lines go: messages to ``say``, failures to ``failure`` (when set)."""

    say: Callable[[str], None]
    failure: Failure | None = None


class ShardLines(io.StringIO):
    """A text stream that forwards shard ``shard``'s messages and failures to ``relay``."""

    def __init__(self, shard: int, relay: Relay) -> None:
        super().__init__()
        self.shard = shard
        self.relay = relay
        self._partial = ""

    def isatty(self) -> bool:
        return False

    def write(self, text: str) -> int:  # keeps nothing: every whole line is forwarded
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        for line in lines:
            self._line(line)
        return len(text)

    def _line(self, line: str) -> None:
        prefix = f"shard {self.shard}: "
        if line.startswith("{"):
            try:
                doc = json.loads(line)
            except ValueError:
                return
            event = doc.get("event")
            if event == "message":
                self.relay.say(prefix + str(doc.get("text", "")))
            elif event == "failure" and self.relay.failure is not None:
                message = str(doc.get("message", ""))
                self.relay.failure(str(doc.get("reason", "")), doc.get("row_id"), prefix + message)
            return
        if line.startswith(_TEXT_PREFIX):
            text = line.removeprefix(_TEXT_PREFIX)
            if not _COUNTS.match(text):
                self.relay.say(prefix + text)
