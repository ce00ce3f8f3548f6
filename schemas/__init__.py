"""The contract between source and sink: topic names, key format, event envelope, partitioning."""
