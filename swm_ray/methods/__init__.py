"""Planners: the searches and baselines that choose a plan, compensation fits, width choices, target checks."""
