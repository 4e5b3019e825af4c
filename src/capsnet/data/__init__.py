"""Datasets held in memory, their transforms and their batch loaders."""
