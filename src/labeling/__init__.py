"""Labels: the teacher, its answer cache, the review queue and its audit page."""
