"""Running layer stacks: in memory or streaming, the plan runner, reference passes, scores, losses."""
