"""The typed config: dataclass schema with a docstring per key (schema), YAML files plus dotted overrides
into a validated Config (loading), and the README reference table generated from the docstrings (reference)."""
