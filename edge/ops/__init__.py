"""Node health for technicians and ops: checks, metrics, status."""
