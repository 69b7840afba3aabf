"""fxprune's graph passes: dependency analysis, structure discovery, rewrite, masking.

Each file holds one pass. Analyses write `node.meta`; transforms take a GraphModule and return one.
"""
