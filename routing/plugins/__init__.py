"""Built-in scheduler plugins, one per module; see registry.default_registry()."""
