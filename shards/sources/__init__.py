"""Importers that turn existing datasets into shard sets."""
