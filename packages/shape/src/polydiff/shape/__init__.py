"""polydiff.shape: 3D shapes — point-cloud diffusion and latent shape diffusion over a point
autoencoder's latents, procedural primitives, PLY/GLB/OBJ export and shape metrics."""

__all__: list[str] = []
