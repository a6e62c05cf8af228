"""The recipe: pydantic models (`schema.py`) and the YAML loader with line numbers and `extends:` (`loader.py`)."""
