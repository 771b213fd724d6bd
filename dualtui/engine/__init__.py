"""The engine: computations on bundles shared by the CLI and the TUI (never imports Textual)."""
