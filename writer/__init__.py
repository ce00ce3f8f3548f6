"""The workload: realistic random inserts, updates and deletes on the source database."""
