"""A site must be a site on the path of both modes: fx records one path of a forward that branches on
``self.training``, so expand reads the other mode's traced model too and leaves a site the other path
uses otherwise (another BN after the conv, the BN normalising something else, the part not tracing)."""
from __future__ import annotations

import dataclasses
from typing import Dict, FrozenSet, Mapping, Optional

from ..matching.find_sites import ConvCall, find_conv_calls
from ..matching.traced_model import TracedModel
from .policies import Verdict, expand_verdict

__all__ = ["OtherMode"]


@dataclasses.dataclass(frozen=True)
class _OtherSite:
    verdict: Verdict
    # The BN the conv's output goes to there (None: none, or a site rewritten without its BN).
    norm_name: Optional[str]


@dataclasses.dataclass(frozen=True)
class OtherMode:
    """The sites as the forward of the other mode shows them."""

    traced: TracedModel
    sites: Mapping[str, _OtherSite]
    # Each BN -> the convs whose output it takes there.
    norm_feeders: Mapping[str, FrozenSet[str]]

    @classmethod
    def of(cls, traced: TracedModel, include_unnormed: bool) -> "OtherMode":
        sites: Dict[str, _OtherSite] = {}
        feeders: Dict[str, set] = {}
        for part in traced.parts:
            for call in find_conv_calls(part, traced):
                verdict = expand_verdict(call, None, include_unnormed)
                sites[call.name] = _OtherSite(verdict, call.norm_name if verdict.no_norm is None else None)
                if call.norm_name:
                    feeders.setdefault(call.norm_name, set()).add(call.name)
        return cls(traced, sites, {k: frozenset(v) for k, v in feeders.items()})

    def reason(self, call: ConvCall, norm_name: Optional[str]) -> Optional[str]:
        """Why ``call``, rewritten in the model's own mode with the BN ``norm_name``, cannot be in the other."""
        mode = self.traced.mode
        if call.name not in self.sites and self.traced.part_of(call.name) is None:
            owner = self.traced.untraced_owner(call.name)
            label = (owner.name or "<model>") if owner is not None else "<model>"
            return f"in {mode} mode '{label}' does not trace ({owner.error if owner is not None else ''})"
        difference = self._difference(call, norm_name)
        return None if difference is None else f"in {mode} mode the forward takes another path here: {difference}"

    def _difference(self, call: ConvCall, norm_name: Optional[str]) -> Optional[str]:
        site = self.sites.get(call.name)  # absent: not called in this mode
        if site is not None and site.verdict.skip:
            return site.verdict.skip
        if norm_name and self.traced.calls.get(norm_name, 0) and self.norm_feeders.get(norm_name) != {call.name}:
            return f"BatchNorm {norm_name} normalises another input there"
        other_norm = site.norm_name if site is not None else norm_name
        if other_norm != norm_name:
            return f"the conv's output goes to {other_norm or 'no BatchNorm'}, not {norm_name or 'no BatchNorm'}"
        return None

