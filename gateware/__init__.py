"""OpenTSU gateware."""
