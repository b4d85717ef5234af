"""Tasks as data: builtin task YAMLs, real offline data sources, label functions, validators."""
