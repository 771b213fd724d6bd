"""The Textual app behind `dualtui open` (the engine and bundle code never import this)."""
