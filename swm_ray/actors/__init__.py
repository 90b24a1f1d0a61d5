"""Thin @ray.remote shells, the floor above the library: hold a model and delegate each call to the library."""
