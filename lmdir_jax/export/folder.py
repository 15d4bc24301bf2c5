"""The files of an export folder (`lmdir export torch`), named once for the writer
(`convert.py`) and the reader (`torch_model.load`); importable without JAX and torch."""

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
README_FILE = "README.md"
EXPORT_FILES = (WEIGHTS_FILE, CONFIG_FILE, README_FILE)  # all that an export folder holds
