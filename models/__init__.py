"""Pure compute: volumes in, results out. torch is imported only by pipelines, physics, networks."""
