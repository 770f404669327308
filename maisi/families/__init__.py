"""Model families: what builds, loads and samples each kind of model, next to its presets."""
