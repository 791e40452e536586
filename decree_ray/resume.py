"""What a scan can take from the finished table instead of scanning: the resume and dedupe state.

Three ways a row is reused, cheapest first:
- an unchanged entry (its listing identity and content key match a finished row): no download at all;
- identical content (the same content key, this run or an earlier one): downloaded and hashed, not scanned;
- a table from before the content_key column: reused for its own uri only.
Rows made with other settings (profile, overrides, steps, threshold, shadow set, their architecture's bases)
are never reused.
"""

from __future__ import annotations

from typing import Any

from . import results as results_mod
from .sources import EncoderTask, apply_sidecar
from .storage import S3Options


class ResumeState:
    def __init__(self, finished: list[dict[str, Any]], keys: results_mod.SettingsKeys, profile: str, s3: S3Options):
        self.keys, self.profile, self.s3 = keys, profile, s3  # keys(arch): this run's settings key for arch
        self.by_content = results_mod.ok_rows_by_content(finished)
        self.legacy = results_mod.legacy_ok_rows(finished)
        self.by_uri = results_mod.ok_rows_by_uri(finished, keys)
        self.other_settings = sum(1 for r in finished if r["status"] == "ok"
                                  and results_mod.made_with(r.get("content_key"), keys) is False)

    def key(self, sha256: str, task: EncoderTask) -> str:
        return results_mod.task_content_key(sha256, task, self.profile, self.keys(task.arch))

    def unchanged_row(self, task: EncoderTask) -> dict[str, Any] | None:
        """The finished row of an entry whose listing identity is unchanged, if its key still matches: the
        sidecar (a few hundred bytes) is read again, the checkpoint is not downloaded."""
        prev = self.by_uri.get(task.uri)
        if prev is None or not task.identity or prev.get("source_identity") != task.identity:
            return None
        try:
            current = apply_sidecar(task, self.s3) if task.sidecar else task
        except Exception:  # noqa: BLE001 - a sidecar that no longer parses: fetch and let the worker say why
            return None
        if self.key(prev["sha256"], current) != prev.get("content_key"):
            return None
        return {**prev, "id": current.id, "label": current.label or prev.get("label")}

    def done_row(self, key: str, task: EncoderTask, sha256: str) -> dict[str, Any] | None:
        """A finished row for this content (or, from an old table, for this very uri and bytes)."""
        return self.by_content.get(key) or self.legacy.get((task.uri, sha256, task.arch, self.profile))

    def record(self, key: str, row: dict[str, Any]) -> None:
        if row["status"] == "ok":
            self.by_content[key] = row
