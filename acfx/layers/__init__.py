"""The nn modules acfx builds and their arithmetic: no torch.fx here."""
