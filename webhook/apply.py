"""The webhook apply rules: what a batch of inbox rows becomes, in one transaction.

    claim pending rows (or the given ids)         txn.claim_pending / txn.claim
    read each body                                 parse(body) -> ParsedInboxBody, or raises
    the page rows of the bodies' Facebook pages    txn.page_rows
    each page row's records, then the unsends      txn.write_records, txn.drop_unsent_content
    each row's status                              txn.mark

A row ends (SPEC semantics 10):

    applied   one of its Facebook pages is registered (even when none of its items is of a kind
              stored); items the parser skipped are listed in its `error`
    ignored   none of its pages is registered (`error` still lists skipped items)
    invalid   the body cannot be read (`error` says why and where); kept, replayable after a fix

A body goes to every page row of its Facebook page (each user who registered it has one). The
rules live here, storage only provides the primitives (`storage.inbox.Transaction`), composed the
way synapse's `runInteraction(desc, fn)` composes store methods. `fn` awaits nothing but those
primitives (on SQLite it runs on the writer thread, in one go); `parse` is plain CPU work.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from core.records import ConversationRecord
from storage import Storage
from storage.base import WriteCounts
from storage.inbox import Transaction, error_text


@dataclass(frozen=True)
class ParsedInboxBody:
    """What the applier read from one inbox body.

    A row ends `applied` when one of `pages` is registered (even if all its items were of
    kinds not stored), else `ignored`; `error` (items skipped, with their JSON paths) is kept
    on the row either way.
    """

    items: Sequence[tuple[str, ConversationRecord]] = ()  # (facebook page id, record)
    pages: Sequence[str] = ()  # facebook page ids the body has messaging items for
    unsent: Sequence[tuple[str, str, str]] = ()  # (facebook page id, contact, mid): content to drop
    error: str | None = None


# Reads an inbox body; raises on a body it cannot read (the row ends `invalid` with the message).
WebhookParser = Callable[[bytes], ParsedInboxBody]


@dataclass
class ApplyReport:
    """What one batch did to the inbox."""

    claimed: int = 0
    applied: int = 0
    ignored: int = 0
    invalid: int = 0
    counts: WriteCounts = field(default_factory=WriteCounts)
    received_at: list[int] = field(default_factory=list)  # of the rows applied (ms; for the lag metric)


async def apply_batch(
    storage: Storage, parse: WebhookParser, limit: int, ids: Sequence[int] | None = None
) -> ApplyReport:
    """Claim up to `limit` pending rows (or just `ids`), apply them, mark them: one transaction.

    Retried as a whole on a transient failure (storage's rule); any other failure rolls it all
    back and raises, leaving the rows pending (the applier then tries them one by one).
    """

    async def apply(txn: Transaction) -> ApplyReport:
        claimed = await (txn.claim_pending(limit) if ids is None else txn.claim(ids))
        report = ApplyReport(claimed=len(claimed))
        if not claimed:
            return report
        status: dict[int, tuple[str, str | None]] = {}
        parsed: dict[int, ParsedInboxBody] = {}
        for row in claimed:
            try:
                parsed[row.id] = parse(row.body)
            except Exception as exc:  # a body that cannot be read stays replayable after a fix
                status[row.id] = ("invalid", error_text(str(exc)))
        page_rows = await txn.page_rows([fb for body in parsed.values() for fb in body.pages])
        by_page: dict[str, list[ConversationRecord]] = {}
        unsent: list[tuple[str, str, str]] = []
        for inbox_id, body in parsed.items():
            registered = any(fb in page_rows for fb in body.pages)
            status[inbox_id] = ("applied" if registered else "ignored", body.error)
            for fb, rec in body.items:
                for pid in page_rows.get(fb, ()):
                    by_page.setdefault(pid, []).append(rec)
            unsent.extend(
                (pid, contact, mid) for fb, contact, mid in body.unsent for pid in page_rows.get(fb, ())
            )
        for pid in sorted(by_page):  # one order for every writer: fewer lock cycles
            report.counts.add(await txn.write_records(pid, by_page[pid]))
        # After the writes: a message and its unsend may come in one batch.
        await txn.drop_unsent_content(unsent)
        received = {row.id: row.received_at for row in claimed}
        report.received_at = [received[i] for i, (st, _) in status.items() if st == "applied"]
        for name in ("applied", "ignored", "invalid"):
            these = [(i, err) for i, (st, err) in status.items() if st == name]
            setattr(report, name, len(these))
            await txn.mark(name, these)
        return report

    return await storage.run_interaction("apply_webhooks", apply)
