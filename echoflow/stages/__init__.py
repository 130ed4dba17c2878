"""The EchoFlow stages: one list of names, the networks and their store, each stage's objective and data.

- `objectives`: how a batch becomes each stage's losses (the `Stage` protocol of `trainer`).
- `networks`: build a stage's network from the ``model`` config; save / load its weights (safetensors).
- `data`: what each stage trains on (pixel frames or clips; VAE latents, encoded at the site).
- `trainer`: the one training loop every stage runs, centralized or at a federated site.
"""

STAGES = ("vae", "image_flow", "reid", "video_flow", "ef")
"""Stage names, in the order the pipeline trains them (the VAE first: the latent stages encode with it)."""

GENERATIVE = STAGES[:4]
"""The four EchoFlow models; ``ef`` is the evaluation's regressor."""

LATENT_STAGES = STAGES[1:4]
"""Stages that train on VAE latents rather than pixels."""
