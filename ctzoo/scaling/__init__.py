"""Scaling tools: LEMON lossless expansion (:mod:`.expand`, :mod:`.channel_trace`, :mod:`.zoo_expand`),
gradient compression for DDP (:mod:`.compressors`, :mod:`.compress`: CSER, two-way, PowerSGD), Baechi placement
across memory-capped devices (:mod:`.placement`)."""
