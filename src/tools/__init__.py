"""Tools around the pipeline: derived code deps, the preflight check, the remotes probe, the review report."""
