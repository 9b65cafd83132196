"""Recorder: telemetry history, the audit log and rule traces, written in batches; hourly
statistics and retention."""
