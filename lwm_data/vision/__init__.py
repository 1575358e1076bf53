"""Vision: frames from images and videos (frames), media inputs (media), LWM's vision sequences (sequences)."""
