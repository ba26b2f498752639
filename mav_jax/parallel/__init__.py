"""Device meshes and sharding strategies (tables of logical-axis rules)."""
