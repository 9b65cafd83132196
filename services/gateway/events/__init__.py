"""Publishing to the bus, replaying it and following it live (SSE)."""
