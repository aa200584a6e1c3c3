"""region_node."""
