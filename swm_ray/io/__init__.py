"""Input and output: paths local or on S3, the download cache, atomic outputs, checkpoints, models, data."""
