"""polydiff.image: text-to-image diffusion on polydiff's core.

Rooms: ``synthetic`` (built-in sets: sklearn's digits), ``data`` (folders of captioned images,
shard decoding), ``model`` (pixel U-Net / DiT, KL autoencoder, latent DiT), ``recipe`` (the
trainer plug-in, entry point ``image``), ``pipeline`` (generation from a checkpoint),
``export`` (file naming) and ``metrics`` (digit classifier agreement).
"""
