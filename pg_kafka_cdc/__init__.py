"""pg-kafka-cdc: what the connectors share (`common`), and the operator's tools `cdc-status` and
`cdc-verify`."""
