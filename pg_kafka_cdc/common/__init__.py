"""Pieces every program of the pipeline shares: settings, errors, logging, connections."""
