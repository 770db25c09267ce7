"""Review a change to the model at a glance: one report of what it did, for the merge request.

`python -m src.tools.review BASE [HEAD]` (`make review BASE=main`): see `__main__`. `revision` reads a
revision from git and DVC, `compare` computes what changed, `report` writes the folder, `forge`
posts it as one comment per merge request, updated in place.
"""
