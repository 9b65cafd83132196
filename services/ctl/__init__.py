"""`smarthome` for operators: the platform's HTTP API from a terminal, as any client uses it.

Nothing here imports the services or `libs`: the CLI knows the API only by its routes and
bodies, like a script written against `/schema/openapi.json`.
"""
