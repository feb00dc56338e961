"""OpenTSU host package."""
