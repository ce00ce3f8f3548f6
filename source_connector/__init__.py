"""cdc-source."""
