"""``sparse-view-ct``: simulate a fan-beam sparse-view scan of a CT volume and reconstruct it."""
