"""Rules: evaluate user rules on device state; fire once per episode; durable `for` timers."""
