"""`/api/v1/system`: the platform's own processes and their status."""
