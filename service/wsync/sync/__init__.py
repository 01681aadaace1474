"""The sync layer: the registry of what the service runs (registry.py, records.py, trainer.py), the
transfer groups (groups.py), the transports (transports.py), the run of a sync (run.py) and of a
comparison (comparison.py), and the submit-time checks (checks.py). The API calls into it; it calls
the actors (through wsync.actors.ref) and nothing above."""
