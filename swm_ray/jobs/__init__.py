"""Ray jobs, above the actors: start Ray, fan work out to actors, gather once, write artifacts."""
