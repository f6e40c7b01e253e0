"""torch.fx tracing and the finders of conv sites and branch sums: facts, no rewriting."""
