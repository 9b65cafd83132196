"""The web UI: one self-contained page, no build step."""
