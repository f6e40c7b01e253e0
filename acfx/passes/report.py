"""What a pass did: every site it found, what it did there, and why. The one channel for what a pass left.

Each pass returns its entries; the verb that ran it puts them in one :class:`Report` (``return_report=True``).
Warnings are kept for what a user must act on (a site left because of a hook, a model collapsed in train
mode); everything else a pass left is in the report, with the reason.
"""
from __future__ import annotations

import collections
import dataclasses
import enum
from typing import Dict, Iterable, List, Tuple

__all__ = ["Action", "Entry", "Report"]


class Action(str, enum.Enum):
    """What a pass did at one site (a string: ``entry.action == "expanded"`` holds)."""

    EXPANDED = "expanded"
    COLLAPSED = "collapsed"
    FOLDED = "folded"
    UNFROZEN = "unfrozen"
    SWITCHED = "switched"  # set_exact_impl: the block now computes its forward with the implementation asked
    SKIPPED = "skipped"
    UNTRACED = "untraced"

    def __str__(self) -> str:
        return self.value


# Actions that change nothing: what a pass left and why.
_LEFT = (Action.SKIPPED, Action.UNTRACED)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One site: a conv (expand, BN folding), a block of summed branches (collapse), a BN (unfreeze) or a
    block's forward (set_exact_impl)."""

    # Qualified module name in the model ("" for the model itself).
    name: str
    action: Action
    # What was there, e.g. "Conv2d 3x3 → BatchNorm2d".
    what: str = ""
    # Why it was skipped, or what changed beyond the expected rewrite.
    detail: str = ""
    # True when the result differs in structure from the original (e.g. a conv gained a bias).
    changes_structure: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "action", Action(self.action))


@dataclasses.dataclass(frozen=True)
class Report:
    """Returned by every verb with ``return_report=True``; ``print(report)`` gives a table."""

    pass_name: str
    entries: Tuple[Entry, ...] = ()

    @classmethod
    def from_entries(cls, pass_name: str, *groups: Iterable[Entry]) -> "Report":
        """A report of the entries of ``groups``, in order."""
        return cls(pass_name, tuple(entry for group in groups for entry in group))

    def of(self, action: str) -> List[Entry]:
        """The entries of one action (``report.of("skipped")``)."""
        return [e for e in self.entries if e.action == action]

    @property
    def changed(self) -> List[Entry]:
        return [e for e in self.entries if e.action not in _LEFT]

    @property
    def skipped(self) -> List[Entry]:
        return self.of(Action.SKIPPED)

    @property
    def structure_changes(self) -> List[Entry]:
        return [e for e in self.entries if e.changes_structure]

    def skip_reasons(self) -> Dict[str, int]:
        """Skip reasons with their counts, most frequent first."""
        return dict(collections.Counter(e.detail for e in self.skipped).most_common())

    def summary(self) -> str:
        counts = collections.Counter(e.action for e in self.entries)
        parts = [f"{counts[a]} {a.value}" for a in Action if counts[a]]
        text = f"acfx {self.pass_name}: {', '.join(parts) or 'nothing found'}"
        if self.structure_changes:
            text += f"; {len(self.structure_changes)} structure change(s)"
        return text

    def format_table(self) -> str:
        rows = [("module", "action", "what", "detail")]
        rows += [(e.name or "<model>", e.action.value, e.what, e.detail) for e in self.entries]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3]
                 for row in rows]
        return "\n".join([self.summary(), *(line.rstrip() for line in lines)])

    def to_dict(self) -> dict:
        return {"pass": self.pass_name, "summary": self.summary(),
                "entries": [{**dataclasses.asdict(e), "action": e.action.value} for e in self.entries]}

    def __str__(self) -> str:
        return self.format_table()
