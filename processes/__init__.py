"""Example services; each file holds one @process class."""
