"""The app's tabs, one per module; each renders from the app's current state."""
