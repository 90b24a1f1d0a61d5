"""Recipes (floor 3): start Ray, fan work out to actors, gather once, write artifacts."""
