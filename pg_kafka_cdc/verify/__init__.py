"""cdc-verify."""
