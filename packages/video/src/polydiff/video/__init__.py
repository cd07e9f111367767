"""polydiff.video: text-to-video (and image-to-video) diffusion on polydiff's core.

Rooms, as in every modality: ``synthetic`` (built-in sets: moving shapes), ``data`` (folders of
captioned videos, decoding with decord / PyAV, clip sampling, buckets), ``model`` (the
spacetime-patch video DiT), ``recipe`` (the trainer plug-in, entry point ``video``),
``pipeline`` (generation from a checkpoint, chunked long videos, first-frame conditioning),
``export`` (MP4 / GIF) and ``metrics`` (prompt adherence, Frechet distance, temporal
consistency, FVD).
"""
