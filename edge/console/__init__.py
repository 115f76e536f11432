"""The technician console's web app; for now health and metrics for ops."""
