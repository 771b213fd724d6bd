"""Command palette provider: namespaced titles ("view: …", "score: …", "export: …")."""

from __future__ import annotations

from functools import partial

from textual.command import DiscoveryHit, Hit, Hits, Provider


class DualtuiCommands(Provider):
    def entries(self) -> list[tuple[str, object, str]]:
        app = self.app
        out = [
            ("view: overview", partial(app.action_view, "overview"), "manifest and verify"),
            ("view: tests", partial(app.action_view, "tests"), "browse and filter test items"),
            ("view: spotlight", partial(app.action_view, "spotlight"), "ranked training patterns"),
            ("view: layers", partial(app.action_view, "layers"), "initial vs learned, per layer"),
            ("view: tasks & time", partial(app.action_view, "tasks"), "attention mass by task, class and step"),
            ("view: curve", partial(app.action_view, "curve"), "the sorted score curve of the ranking"),
            ("view: compare", partial(app.action_view, "compare"), "two items side by side (c pins the second)"),
            ("compare: pin this item as the second", app.action_pin_other, "then pick another item"),
            ("curve: toggle log rank axis", app.action_toggle_log, ""),
            ("order: highest first", partial(app.set_state, reverse=False), ""),
            ("order: lowest first", partial(app.set_state, reverse=True), ""),
            ("group: per pattern", partial(app.set_state, group="pattern"), ""),
            ("group: per training example", partial(app.set_state, group="example"), ""),
            *([("group: per training token (example, position)", partial(app.set_state, group="position"), "text runs")]
              if "position" in app.open_run.groups else []),
            ("export: ranking as CSV", partial(app.action_export, "csv"), ""),
            ("export: ranking as JSON", partial(app.action_export, "json"), ""),
            ("export: screen as SVG", app.action_svg, ""),
            ("help: keys", app.action_help, ""),
        ]
        for score in ("attention", "magnitude", "effect", "cosine"):
            out.append((f"score: {score}", partial(app.set_state, by=score), ""))
        for name in app.open_run.query_set_names:
            out.append((f"queries: {name}", partial(app.action_queries, name), "browse this query set's items"))
        for layer in app.open_run.layers:
            out.append((f"layer: {layer}", partial(app.set_state, layer=layer), ""))
        return out

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for title, callback, help_text in self.entries():
            score = matcher.match(title)
            if score > 0:
                yield Hit(score, matcher.highlight(title), callback, help=help_text or None)

    async def discover(self) -> Hits:
        """What the palette lists before anything is typed: every command of the app."""
        for title, callback, help_text in self.entries():
            yield DiscoveryHit(title, callback, help=help_text or None)
