"""The engine: computations on bundles shared by the CLI and the TUI (never imports Textual).

Notebook use:

    from dualtui.bundle import Bundle
    from dualtui.engine import spotlights, layer_votes, verify_bundle
    b = Bundle.open("run.safetensors")
    s = spotlights(b, "net.4", [0, 1, 2], top=10)[0]
    s.ranked[("effect", "example", False)]      # list of Ranked, best first
    s.masses.task_abs_sum, s.summary.learned_share

Names are imported lazily so that `import dualtui.engine.verify` stays free of torch.
"""

from typing import Any

_EXPORTS = {
    "spotlights": "spotlight", "Spotlight": "spotlight", "Ranked": "spotlight", "Masses": "spotlight",
    "LayerSummary": "spotlight", "SCORES": "spotlight", "GROUPS": "spotlight",
    "layer_votes": "votes", "LayerVotes": "votes",
    "verify_bundle": "verify", "verify_layer": "verify", "VerifyReport": "verify", "LayerCheck": "verify",
    "pick_device": "stream",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
