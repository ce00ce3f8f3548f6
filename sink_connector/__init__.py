"""cdc-sink."""
