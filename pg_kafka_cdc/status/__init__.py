"""cdc-status."""
