"""Guest side: the image builder and SSH access."""
