"""TEMPORARY placeholder until the tree-attention module lands (issue 11): no model verifies trees yet."""


def supports_tree(model) -> bool:
    return False
