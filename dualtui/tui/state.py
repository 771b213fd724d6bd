"""What the views show, handed to each pane: the panes never see the App (no import cycle)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from ..engine.spotlight import Spotlight


@dataclass(frozen=True)
class ViewState:
    """The current choice of item, layer and ranking, and the spotlights computed so far."""

    test: int
    layer: str
    by: str
    group: str
    reverse: bool
    results: Mapping[str, Spotlight] = field(default_factory=dict)  # layer -> spotlight of `test`
    # The Compare tab's second item and its spotlights (None: none picked yet).
    other: int | None = None
    other_results: Mapping[str, Spotlight] = field(default_factory=dict)
    log_rank: bool = False  # the score curve's rank axis on a log scale
    per_group: bool = False  # the Curve tab: one sorted top-500 curve per (task, class) instead of the ranking's

    @property
    def spot(self) -> Spotlight | None:
        """The current item's spotlight at the current layer (None while it is computed)."""
        return self.results.get(self.layer)
