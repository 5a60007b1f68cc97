"""Ray Serve application builders and YAML configs; installed as raylm.deployments."""
