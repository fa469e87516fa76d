"""The benchmark behind ``deformarray bench`` (private), moved here from deformarray/_bench*.py."""
