"""Inference over whole CT volumes: the code path shared by ctzoo infer, the service and the PACS bridge."""
