"""Device actors: apply each device's events, in order, exactly once, to its state."""
