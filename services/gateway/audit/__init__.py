"""The audit log: who did what, when, to which device, with what result."""
