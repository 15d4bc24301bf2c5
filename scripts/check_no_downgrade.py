"""Installing lmdir-jax must not change a notebook's transformers, diffusers, hub or torch.

Usage: python scripts/check_no_downgrade.py EXTRAS   (run with the environment's own python)
Asks pip what `pip install -e .[EXTRAS]` would install (--dry-run --report) and exits 1 naming each
watched package it would replace.
"""

import json
import subprocess
import sys
from importlib import metadata

WATCHED = ("transformers", "diffusers", "huggingface-hub", "torch", "jax", "flax", "numpy")


def main() -> int:
    extras = sys.argv[1] if len(sys.argv) > 1 else ""
    target = f".[{extras}]" if extras else "."
    out = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report", "-", "-e", target],
        check=True, capture_output=True, text=True).stdout
    changed = []
    for item in json.loads(out).get("install", []):
        name = item["metadata"]["name"].lower().replace("_", "-")
        if name in WATCHED:
            try:
                have = metadata.version(name)
            except metadata.PackageNotFoundError:
                continue
            if have != item["metadata"]["version"]:
                changed.append(f"{name} {have} -> {item['metadata']['version']}")
    for line in changed:
        print(f"[ci] installing lmdir-jax{target[1:]} would change {line}")
    if not changed:
        print(f"[ci] installing lmdir-jax{target[1:]} changes none of {', '.join(WATCHED)}")
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main())
