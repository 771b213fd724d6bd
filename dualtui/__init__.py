"""dualtui: spotlights of attention over the exact dual form of trained linear layers."""

__version__ = "0.1.0"
