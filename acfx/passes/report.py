"""What a pass did: every site it found, what it did there, and why."""
from __future__ import annotations

import collections
import dataclasses
from typing import Dict, List

__all__ = ["Entry", "Report"]


@dataclasses.dataclass
class Entry:
    """One site: a conv (expand, BN folding) or a block of summed branches (collapse)."""

    # Qualified module name in the model.
    name: str
    # "expanded", "collapsed", "folded", "skipped" or "untraced".
    action: str
    # What was there, e.g. "conv 3x3 → BatchNorm2d".
    what: str = ""
    # Why it was skipped, or what changed beyond the expected rewrite.
    detail: str = ""
    # True when the result differs in structure from the original (e.g. a conv gained a bias).
    changes_structure: bool = False


@dataclasses.dataclass
class Report:
    """Returned by expand/collapse with ``return_report=True``; ``print(report)`` gives a table."""

    pass_name: str
    entries: List[Entry] = dataclasses.field(default_factory=list)

    def add(self, *args, **kwargs) -> Entry:
        entry = Entry(*args, **kwargs)
        self.entries.append(entry)
        return entry

    def of(self, action: str) -> List[Entry]:
        return [e for e in self.entries if e.action == action]

    @property
    def changed(self) -> List[Entry]:
        return [e for e in self.entries if e.action not in ("skipped", "untraced")]

    @property
    def skipped(self) -> List[Entry]:
        return self.of("skipped")

    @property
    def structure_changes(self) -> List[Entry]:
        return [e for e in self.entries if e.changes_structure]

    def skip_reasons(self) -> Dict[str, int]:
        """Skip reasons with their counts, most frequent first."""
        return dict(collections.Counter(e.detail for e in self.skipped).most_common())

    def summary(self) -> str:
        counts = collections.Counter(e.action for e in self.entries)
        parts = [f"{counts[a]} {a}" for a in ("expanded", "collapsed", "folded", "skipped", "untraced")
                 if counts[a]]
        text = f"acfx {self.pass_name}: {', '.join(parts) or 'nothing found'}"
        if self.structure_changes:
            text += f"; {len(self.structure_changes)} structure change(s)"
        return text

    def format_table(self) -> str:
        rows = [("module", "action", "what", "detail")]
        rows += [(e.name or "<model>", e.action, e.what, e.detail) for e in self.entries]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3]
                 for row in rows]
        return "\n".join([self.summary(), *(line.rstrip() for line in lines)])

    def to_dict(self) -> dict:
        return {"pass": self.pass_name, "summary": self.summary(),
                "entries": [dataclasses.asdict(e) for e in self.entries]}

    def __str__(self) -> str:
        return self.format_table()
