"""Thin @ray.remote shells (floor 2): hold a model and delegate each call to the library."""
