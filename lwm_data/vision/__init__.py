"""The vision cores, plain functions on one item (no Beam): frames from images and videos (frames),
media inputs (media), VQ-GAN codes + text in LWM's vision layout (sequences), codes back to pictures
(preview)."""
