"""Reward functions for RL fine-tuning; `registry.make_reward(name, path)` builds one.

Every reward is called as `reward(images, prompts, source_images=None) -> [B]`
(numpy). Those with `differentiable_available = True` also expose
`tokenize(prompts) -> (ids, mask)` and a jax `differentiable(images, ids, mask)
-> [B]` that ReFL backpropagates through (images [B, H, W, 3] in [-1, 1]).

  shapes          exact programmatic shapes reward (prompts = metadata records)
  learned_shapes  small learned image-text model for shapes (shipped weights)
  clip            CLIP cosine similarity from a local transformers/OpenCLIP directory
"""
