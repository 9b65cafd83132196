"""The deployment gate: Dockerfile, Helm chart, Tiltfile."""
