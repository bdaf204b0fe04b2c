"""Baechi in the zoo (arXiv 2301.08695): fast algorithmic placement of a model's forward graph across
memory-capped devices. :mod:`.graph` (profile, devices, communication model, plan), :mod:`.profile` (torch
profiling), :mod:`.algorithms` (m-TOPO, m-ETF, m-SCT), :mod:`.planner` (choose a plan, fall back, refuse),
:mod:`.simulate` (step time and memory of a plan and the baselines), :mod:`.execute` (run a placed model)."""
