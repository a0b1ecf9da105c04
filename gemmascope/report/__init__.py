"""The static HTML report: every SAE's metrics, frontiers, densities and feature pages."""
