"""`python -m devices.simulator`: thousands of virtual devices on one connection."""
