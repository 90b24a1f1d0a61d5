"""Recipes: library stages composed into a whole run in one process (compress, width, a grid trial)."""
