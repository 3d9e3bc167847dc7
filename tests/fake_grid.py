"""A stand-in for Flower's ``Grid`` in unit tests of the server's messaging.

It records the messages pushed to it and answers each with :meth:`FakeGrid.answer`, which
tests override to play a site that replies, fails or hangs. (Message construction needs
Flower's task identity: use the ``flower_task_identity`` fixture of ``conftest.py``.)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from flwr.app import ConfigRecord, Message, RecordDict


class FakeGrid:
    """Nodes ``online`` answer every message at once with ``{"ok": 1}`` unless
    :meth:`answer` says otherwise."""

    def __init__(self, online: Iterable[int]) -> None:
        self.online = set(online)
        self.sent: dict[str, Message] = {}

    def get_node_ids(self) -> list[int]:
        return sorted(self.online)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for m in messages:
            mid = f"m{len(self.sent)}-{m.metadata.dst_node_id}"
            m.metadata.__dict__["_message_id"] = mid  # what the SuperLink would assign
            self.sent[mid] = m
            ids.append(mid)
        return ids

    def pull_messages(self, ids: Sequence[str]) -> list[Message]:
        replies = (self.answer(self.sent[mid]) for mid in ids)
        return [r for r in replies if r is not None]

    def answer(self, message: Message) -> Message | None:
        """The reply to ``message``; ``None`` while the site has not answered."""
        return Message(RecordDict({"config": ConfigRecord({"ok": 1})}), reply_to=message)
