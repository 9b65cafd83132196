"""The device registry, its runtime state, commands and history."""
