"""`smarthome up`: the one-machine supervisor (bus, migrations, services, demo devices)."""
