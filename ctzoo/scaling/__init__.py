"""Scaling tools: LEMON expansion, gradient compression, Baechi placement; empty until those issues land."""
