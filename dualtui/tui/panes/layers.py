"""Per-layer contributions for the current test item, as bars."""

from __future__ import annotations

from rich.console import Group, RenderableType
from rich.text import Text

from ...units import num
from ..state import ViewState
from .base import RenderedPane


class LayersPane(RenderedPane):
    def build(self, state: ViewState) -> RenderableType:
        from ..render import bar_table

        width = self.bar_width
        parts = [Text(f"test {state.test}: how much of each layer's output comes from the initial weights vs from learning",
                      style="bold")]
        for L in self.run.layers:
            spot = state.results.get(L)
            parts.append(Text(f"\n{L}", style="bold cyan"))
            if spot is None:
                parts.append(Text("computing…", style="yellow"))
                continue
            s = spot.summary
            approximate = self.run.bundle.manifest.approximate
            terms = [("‖w0 q + b0‖ initial", s.initial_norm), ("‖Σ α v‖ learned", s.learned_norm)]
            if approximate:  # the residual is its own row: nothing is silently dropped from the sum
                terms.append(("‖R q‖ not attributed", s.residual_norm))
            norm_max = max(max(v for _, v in terms), 1e-30)
            parts.append(bar_table(terms, width, value_format=num, max_value=norm_max, style="magenta"))
            parts.append(bar_table([("learned share", s.learned_share),
                                    ("effective patterns", s.effective_patterns / max(s.patterns, 1)),
                                    ("top-10 share", s.top10_share), ("top-100 share", s.top100_share)],
                                   width, max_value=1.0))
            if approximate:
                parts.append(Text(f"effective patterns {s.effective_patterns:,.1f} of {s.patterns:,} · APPROXIMATE: "
                                  f"‖R q‖ not attributed to any pattern = {s.residual_share:.0%} of ‖(W_T − w0) q‖", style="yellow"))
            else:
                parts.append(Text(f"effective patterns {s.effective_patterns:,.1f} of {s.patterns:,} · "
                                  f"primal−dual error {s.primal_dual_error:.1e}", style="dim"))
        parts.extend(self._flow(state))
        # The legend once, not under every layer.
        if self.run.bundle.manifest.approximate:
            parts.append(Text("\nAPPROXIMATE: W_T q = w0 q + Σ α v + R q, where R = W_T − w0 − Σ v kᵀ is what the recorded "
                              "patterns leave out (‖R q‖ not attributed to any pattern)", style="italic yellow"))
        parts.append(Text("\ninitial ‖w0 q + b0‖ and learned ‖Σ α v‖: the two terms of the layer's output (W_T q = w0 q + Σ α v) · "
                          "learned share = ‖Σ α v‖ / (‖w0 q + b0‖ + ‖Σ α v‖) · effective patterns = (Σ|α|)²/Σα², "
                          "how many patterns the attention is spread over · top-k share = share of Σ|α| in the k largest |α| · "
                          "primal−dual error: max |W_T q − (w0 q + Σ α v)|", style="italic dim"))
        return Group(*parts)

    FLOW_TOP = 10

    def _flow(self, state: ViewState) -> list[Text]:
        """Layer flow (`dualtui flow --test`): which training examples enter and leave the item's
        top 10 (by the current score, per example) from each layer to the next."""
        key = (state.by, "example", False)
        layers = self.run.layers
        tops = {L: [r.example for r in state.results[L].ranked.get(key, [])][: self.FLOW_TOP]
                for L in layers if L in state.results and key in state.results[L].ranked}
        if len(layers) < 2 or len(tops) < 2:
            return []
        out = [Text(f"\nlayer flow: the top {self.FLOW_TOP} training examples by {state.by}, layer to layer", style="bold")]
        for lo, hi in zip(layers, layers[1:]):
            if lo not in tops or hi not in tops:
                continue
            below = set(tops[lo])
            entered = [e for e in tops[hi] if e not in below]
            left = [e for e in tops[lo] if e not in set(tops[hi])]
            line = Text(f"{lo} → {hi}: ", style="cyan")
            line.append(f"{len(tops[hi]) - len(entered)} stay", style="bold")
            line.append(f" · {len(entered)} enter ")
            line.append(" ".join(map(str, entered)) or "-", style="green")
            line.append(f" · {len(left)} leave ")
            line.append(" ".join(map(str, left)) or "-", style="red")
            out.append(line)
        return out
