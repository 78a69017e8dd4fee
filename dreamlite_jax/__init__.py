"""DreamLite-JAX: one mobile U-Net for text-to-image and text-guided editing."""
