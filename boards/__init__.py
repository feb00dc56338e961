"""OpenTSU boards."""
