"""Write serve_config.gpu.yaml into the RayService manifest's serveConfigV2.

KubeRay takes the Serve config as a string inside the RayService; keeping one source of
truth (serve_config.gpu.yaml) and copying it in avoids two configs drifting apart.
tests/test_production_manifest.py fails while the manifest is out of date.

    python deploy/kuberay/render.py            # rewrite the manifest in place
    python deploy/kuberay/render.py --check    # exit 1 if it is out of date
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVE_CONFIG = ROOT / "serve_config.gpu.yaml"
MANIFEST = Path(__file__).resolve().parent / "rayservice.gpu.yaml"
KEY = "  serveConfigV2: |\n"
INDENT = "    "


def rendered(manifest_text: str, serve_config_text: str) -> str:
    """The manifest with its serveConfigV2 block replaced by the Serve config."""
    head, sep, rest = manifest_text.partition(KEY)
    if not sep:
        raise ValueError(f"{MANIFEST.name}: no {KEY.strip()!r} line")
    # The block ends at the first line indented less than its own content.
    lines = rest.splitlines(keepends=True)
    end = next((i for i, line in enumerate(lines) if line.strip() and not line.startswith(INDENT)), len(lines))
    block = "".join(INDENT + line if line.strip() else "\n" for line in serve_config_text.splitlines(keepends=True))
    return head + sep + block + "".join(lines[end:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the manifest is out of date")
    args = parser.parse_args()
    current = MANIFEST.read_text()
    wanted = rendered(current, SERVE_CONFIG.read_text())
    if args.check:
        if current != wanted:
            print(f"{MANIFEST} is out of date: run python deploy/kuberay/render.py", file=sys.stderr)
            return 1
        return 0
    MANIFEST.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
